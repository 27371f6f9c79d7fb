# Source this on the GPU machine (bash): makes `import turbocompile` work from this checkout.
# 1. editable install; 2. a regular (non-editable) install — an older setuptools without PEP 660 falls
# back to a legacy "develop" install, which cannot map passes/ and kernels/ under turbocompile/;
# 3. a copy of the sources laid out as the installed package, on PYTHONPATH.
# The import is checked from /tmp: from the repo root, ./turbocompile would shadow the installed one.
_tc_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_tc_ok() { (cd /tmp && python3 -c "import turbocompile.kernels, turbocompile.passes" 2>/dev/null); }
if pip install -q --no-deps --no-build-isolation -e "$_tc_root" >/tmp/tc_pip.log 2>&1 && _tc_ok; then
  echo "[gpu_env] turbocompile installed (editable)" >&2
elif pip install -q --no-deps --no-build-isolation "$_tc_root" >>/tmp/tc_pip.log 2>&1 && _tc_ok; then
  echo "[gpu_env] turbocompile installed (regular install; editable unavailable)" >&2
else
  echo "[gpu_env] pip install unavailable (see /tmp/tc_pip.log); using a source mirror" >&2
  grep -iE "error|setuptools" /tmp/tc_pip.log | head -5 >&2
  rm -rf /tmp/tc_src && mkdir -p /tmp/tc_src
  cp -r "$_tc_root/turbocompile" /tmp/tc_src/
  cp -r "$_tc_root/passes" /tmp/tc_src/turbocompile/passes
  cp -r "$_tc_root/kernels" /tmp/tc_src/turbocompile/kernels
  cp -r "$_tc_root/recipes" /tmp/tc_src/turbocompile/recipes
  export PYTHONPATH=/tmp/tc_src${PYTHONPATH:+:$PYTHONPATH}
fi
(cd /tmp && python3 -c "import setuptools, torch, triton, turbocompile; print('[gpu_env] setuptools', setuptools.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())") >&2
