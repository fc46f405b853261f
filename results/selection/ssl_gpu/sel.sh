#!/bin/bash
# SSL selection on the lent GPU machine (`bash .whl/sel.sh METHOD [CONFIG ...]`): no data folder there, images from the carried
# 160x128 cache (.whl/sel, made by prep.py); .whl/ holds this script, ssl_sel.py and the wheels the image lacks
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L; nproc
timeout ${SEL_SECONDS:-450} python3 .whl/ssl_sel.py "$@" 2>&1 | grep -v -i "warn\|eval mode\|log_every_n_steps\|treespec" | tail -120
python3 -c "import json,glob,os; json.dump([json.load(open(p)) for p in sorted(glob.glob('/tmp/dsel/parts/*.json'))], open(os.environ['OUT']+'/all.json','w'), indent=1)"; ls -la $OUT
true
