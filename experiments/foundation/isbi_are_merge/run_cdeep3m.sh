# The same recipes and fresh seeds on CDeep3M mitochondria (IoU and instance F1), written before the runs.
set -x
P=.venv/bin/python
for s in 3 4 5; do
$P experiments/foundation/finetune.py --shared ../shared/data/em --out runs/cdeep_fresh/zoo_sp28 \
  --datasets cdeep3m --inits zoo --checkpoint zoo:em_unet16_hc15k --fractions 0.1 --seeds $s \
  --lr 3e-3 --steps 1200 --regime mean_teacher \
  --set regime.init=pretrained regime.shrink=0.2 regime.perturb=0.8 --tag _lr3e-3_s1200_mt_sp28
$P experiments/foundation/finetune.py --shared ../shared/data/em --out runs/cdeep_fresh/random_mt \
  --datasets cdeep3m --inits random --fractions 0.1 --seeds $s --lr 3e-3 --steps 1200 \
  --regime mean_teacher --random-regime mean_teacher --set regime.init=pretrained --tag _lr3e-3_s1200_mt
done
