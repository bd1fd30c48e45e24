#!/usr/bin/env bash
# The whole test suite against one torch release, in a virtual environment of its own (issue #18).
#
#   bash scripts/torch_matrix.sh VERSION [PYTHON] [--rm] [-- PYTEST ARGS...]
#
#   bash scripts/torch_matrix.sh 2.6.0 --rm                                   # the floor, python3
#   bash scripts/torch_matrix.sh 2.11.0 /root/.pyenv/versions/3.12.1/bin/python3 --rm   # the GPU machine's
#   bash scripts/torch_matrix.sh 2.6.0 -- tests/test_contract.py -x           # part of the suite
#
# The environment is $STVIT_MATRIX_DIR/torch-VERSION-pyX.Y (default ~/.cache/stvit-torch-matrix,
# outside the repository), made by one pip command: torch==VERSION with this checkout installed
# editable with its test extra, so pip picks the torchvision built for that torch. A second run
# reuses it; --rm deletes it after the run (each is several GB: PyPI's torch wheels bring CUDA).
# The suite runs as the README's command runs it (`python -m pytest -q -n 2 --dist loadfile`, from the
# repository root; PYTEST ARGS replace `-n 2 --dist loadfile`);
# the log goes beside the environments, and the last line printed is the row for the README's table.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

default_args=(-n 2 --dist loadfile)
version= python=python3 remove=0 pytest_args=("${default_args[@]}")
while [ $# -gt 0 ]; do
    case $1 in
    --rm) remove=1 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$version" ]; then version=$1; elif [ "$python" = python3 ]; then python=$1
       else echo "error: unexpected argument $1 (see --help)" >&2; exit 2; fi ;;
    esac
    shift
done
if [ -z "$version" ]; then echo "error: which torch? bash scripts/torch_matrix.sh VERSION [PYTHON] [--rm]" >&2; exit 2; fi
if ! pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "error: $python is not a Python interpreter" >&2; exit 2
fi

root=${STVIT_MATRIX_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stvit-torch-matrix}
venv=$root/torch-$version-py$pyver
log=$root/torch-$version-py$pyver.log
mkdir -p "$root"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, stvit" 2>/dev/null; then
    rm -rf "$venv"
    echo "== $venv: torch==$version and stvit[test] (one pip command)"
    # PIP_CONSTRAINT=/dev/null: a machine-wide constraint file (this project's machines cap torch at
    # the releases kept on their disk) would refuse the exact release asked for; torch is pinned here
    # and torchvision follows it, so nothing is left for a constraint to decide.
    if ! { "$python" -m venv "$venv" &&
           PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q "torch==$version" -e "$repo[test]"; }; then
        echo "error: could not install torch==$version with Python $pyver into $venv" >&2
        rm -rf "$venv"
        exit 1
    fi
fi
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
echo "== torch $torch_version, Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), log $log"

cd "$repo"
start=$SECONDS
"$venv/bin/python" -m pytest -q "${pytest_args[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
minutes=$(( (SECONDS - start + 30) / 60 ))

# pytest's closing line, e.g. "3 failed, 530 passed, 4 skipped, 2 errors in 412.3s (0:06:52)"
summary=$(grep -E '^=*.*(passed|failed|error|skipped).* in [0-9.]+s' "$log" | tail -1 | sed 's/^=* *//; s/ *=*$//')
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
if [ $remove = 1 ]; then rm -rf "$venv"; echo "== removed $venv"; fi
if [ -z "$summary" ]; then  # e.g. a second -q among the arguments: pytest -qq prints no closing line
    echo "no pytest closing line in $log (rc $rc), so no table row (-q twice, or --co, prints none)" >&2
    exit "$rc"
fi
args=$([ "${pytest_args[*]}" != "${default_args[*]}" ] && printf ' --' && printf ' %q' "${pytest_args[@]}")
pyarg=$([ "$python" = python3 ] && echo "" || echo " $python")
echo "| $torch_version | $("$python" -c 'import platform; print(platform.python_version())') | $(count passed) | $(count failed) | $(count skipped) | $(count error) | $(date -u +%F) | ${minutes} min | \`bash scripts/torch_matrix.sh $version$pyarg$args\` |"
exit "$rc"
