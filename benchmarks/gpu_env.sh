# Source this on the GPU machine (bash): makes `import turbocompile` work from this checkout.
# Tries the editable install first; where that is unavailable (seen on the lent machines), falls
# back to a copy of the sources laid out as the installed package (passes/, kernels/ and recipes/
# mapped under turbocompile/) on PYTHONPATH.
_tc_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if pip install -q --no-deps --no-build-isolation -e "$_tc_root" >/tmp/tc_pip.log 2>&1 \
    && python3 -c "import turbocompile.kernels, turbocompile.passes" 2>/dev/null; then
  echo "[gpu_env] turbocompile installed (editable)" >&2
else
  echo "[gpu_env] editable install unavailable ($(tail -n 1 /tmp/tc_pip.log)); using a source mirror" >&2
  rm -rf /tmp/tc_src && mkdir -p /tmp/tc_src
  cp -r "$_tc_root/turbocompile" /tmp/tc_src/
  cp -r "$_tc_root/passes" /tmp/tc_src/turbocompile/passes
  cp -r "$_tc_root/kernels" /tmp/tc_src/turbocompile/kernels
  cp -r "$_tc_root/recipes" /tmp/tc_src/turbocompile/recipes
  export PYTHONPATH=/tmp/tc_src${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, turbocompile; print('[gpu_env] torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >&2
