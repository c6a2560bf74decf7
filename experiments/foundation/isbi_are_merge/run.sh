set -x
P=.venv/bin/python
M=0,0.3,0.4,0.5,0.6,0.7,0.8,0.9
for s in 3 4 5; do
$P experiments/foundation/finetune.py --shared ../shared/data/em --out runs/diag_fresh/zoo_sp28 \
  --datasets isbi --inits zoo --checkpoint zoo:em_unet16_hc15k --fractions 0.1 --seeds $s \
  --lr 3e-3 --steps 1200 --regime mean_teacher --cell-merges $M \
  --set regime.init=pretrained regime.shrink=0.2 regime.perturb=0.8 --tag _lr3e-3_s1200_mt_sp28
$P experiments/foundation/finetune.py --shared ../shared/data/em --out runs/diag_fresh/random_mt \
  --datasets isbi --inits random --fractions 0.1 --seeds $s --lr 3e-3 --steps 1200 --cell-merges $M \
  --regime mean_teacher --random-regime mean_teacher --set regime.init=pretrained --tag _lr3e-3_s1200_mt
done
