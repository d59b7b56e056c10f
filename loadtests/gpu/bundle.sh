#!/usr/bin/env bash
# Build .dev/g: everything a lent CUDA machine needs to run loadtests/gpu_checks.sh, in ONE carry
# (~28 MB), so that a measurement needs one call instead of two back to back (the machine goes back
# after 30 s idle, and a slow turn between two install calls cost whole machine starts).
#   bash loadtests/gpu/bundle.sh            # here, from the repo root (needs ../shared/gpu)
#   run: carry [".dev/g"], command: bash .dev/g/run.sh warm serving ...   (install happens on first use)
set -euo pipefail
shared=${SHARED_GPU:-../shared/gpu}
bash "$shared/stage-mlx-cuda.sh" > /dev/null  # downloads the wheels into .dev/dl (and .dev/p1, .dev/p2)
rm -rf .dev/g && mkdir -p .dev/g/whl
for w in .dev/dl/*.whl; do case "$w" in *mlx_cuda_13-*) ;; *) cp "$w" .dev/g/whl/ ;; esac; done
# what the image lacks besides the staged ones: fastapi's opentelemetry-api, and the server's extras
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .dev/g/whl opentelemetry-api httptools python-multipart
work=$(mktemp -d)
python3 -m zipfile -e .dev/dl/mlx_cuda_13-*.whl "$work/x"
python3 loadtests/gpu/prune_fatbin.py "$work/x/mlx/lib/libmlx.so" --keep-sm "${KEEP_SM:-90}"
tar -C "$work/x" -cf - . | xz -6 -T2 > .dev/g/cuda.tar.xz
rm -rf "$work"
cp -r "$shared/tok" "$shared/make_random_model.py" .dev/g/
cat > .dev/g/install.sh <<'INSTALL'
#!/usr/bin/env bash
# On the GPU host: the small wheels with pip, then MLX's CUDA build unpacked over them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if ! PYTHONPATH=/tmp/site python3 -c 'import mlx.core' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$here"/whl/*.whl
  python3 -c 'import tarfile, sys; tarfile.open(sys.argv[1]).extractall("/tmp/site")' "$here/cuda.tar.xz"
fi
PYTHONPATH=/tmp/site python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), (mx.ones(4) @ mx.ones(4)).item())'
INSTALL
cat > .dev/g/run.sh <<'RUN'
#!/usr/bin/env bash
# bash .dev/g/run.sh PART [PART...]: install if needed, then those gpu_checks parts in order (env passes through).
bash .dev/g/install.sh || exit 9
export PYTHONPATH=/tmp/site:$PWD MAKE_MODEL=.dev/g/make_random_model.py TOK=.dev/g/tok PYTHONUNBUFFERED=1
for part in "$@"; do
  echo "=== $part $(date +%T)"; t0=$(date +%s)
  bash loadtests/gpu_checks.sh "$part"
  echo "=== $part rc=$? $(( $(date +%s) - t0 )) s"
done
RUN
chmod +x .dev/g/*.sh
du -sh .dev/g
