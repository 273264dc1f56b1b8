#!/usr/bin/env bash
# Optional peer runtime for benchmarks: llama.cpp through llama-cpp-python. Not needed by the README or CI.
#
# The registry serves llama-cpp-python only as an sdist, so it is compiled here once (about 15-25 minutes on
# 2 shared cores) into the edge_lora cache and installed from there; later runs only reinstall the wheel.
# It also unpacks the vendored llama.cpp converters (convert_lora_to_gguf.py, convert_hf_to_gguf.py and their
# gguf-py/conversion packages) next to the wheel, so adapters are converted by the same llama.cpp that runs
# them (edge_lora.runtimes.llamacpp finds them there).
#
#   bash tools/build_llamacpp.sh                     # build if needed, install into .venv
#   LLAMA_CPP_SDIST=/path/to/sdist.tar.gz bash ...   # use a downloaded sdist instead of asking the registry
#   FORCE=1 bash tools/build_llamacpp.sh             # rebuild even if the cached wheel exists
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge_lora}
WHEELS=$CACHE/wheels
SRC_DIR=$CACHE/src
CONVERTERS=$CACHE/llama.cpp/$VERSION
PY=.venv/bin/python
# GGML_NATIVE: compile for this CPU (AVX2/AVX-512 as present), as llama.cpp users build it; the wheel is
# therefore only valid on machines like this one, which is why it lives in a per-machine cache.
CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_BLAS=OFF}

if [ ! -x "$PY" ]; then
  echo "error: $PY not found. Create the environment first: bash tools/setup_env.sh" >&2
  exit 1
fi
mkdir -p "$WHEELS" "$SRC_DIR"

sdist=$SRC_DIR/llama_cpp_python-$VERSION.tar.gz
fetch_sdist() {
  [ -f "$sdist" ] && return 0
  if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
    cp "$LLAMA_CPP_SDIST" "$sdist.tmp" && mv "$sdist.tmp" "$sdist"
  else
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$SRC_DIR" "llama-cpp-python==$VERSION" || true
  fi
  if [ ! -f "$sdist" ]; then
    echo "error: could not get $sdist. Download llama_cpp_python-$VERSION.tar.gz and pass it as" \
         "LLAMA_CPP_SDIST=/path/to/it." >&2
    exit 1
  fi
}

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ] || [ -n "${FORCE:-}" ]; then
  fetch_sdist
  echo "building llama-cpp-python $VERSION (niced, ${CMAKE_BUILD_PARALLEL_LEVEL:-2} jobs); log: $WHEELS/build.log"
  # nice + 2 jobs: the machine's cores are shared; the build must not starve other work.
  if ! CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
       nice -n 10 "$PY" -m pip wheel --no-deps -w "$WHEELS" "$sdist" >"$WHEELS/build.log" 2>&1; then
    tail -n 40 "$WHEELS/build.log" >&2
    echo "error: the llama-cpp-python build failed (full log: $WHEELS/build.log). Check that cmake and a" \
         "C++17 compiler are installed, or adjust CMAKE_ARGS." >&2
    exit 1
  fi
  wheel=$(ls -t "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
else
  echo "using cached wheel $wheel"
fi

# --no-deps for the wheel itself (it is ours, not the registry's); its four small dependencies from the
# registry. pip skips the ones already satisfied (numpy, jinja2, typing-extensions come with edge_lora).
"$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
"$PY" -m pip install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
# convert_hf_to_gguf.py imports sentencepiece before it looks for a tokenizer.model (it then falls back to
# tokenizer.json); without the package it crashes instead of falling back.
"$PY" -m pip install -q "sentencepiece>=0.1.98,<0.3.0"

# The converters, from the same llama.cpp that was compiled. Unpacked once; about 2 MB.
if [ ! -f "$CONVERTERS/convert_lora_to_gguf.py" ]; then
  fetch_sdist
  tmp=$(mktemp -d "$CACHE/llama.cpp-unpack.XXXXXX")
  top=llama_cpp_python-$VERSION/vendor/llama.cpp
  tar xzf "$sdist" -C "$tmp" "$top/convert_lora_to_gguf.py" "$top/convert_hf_to_gguf.py" "$top/conversion" \
    "$top/gguf-py"
  mkdir -p "$(dirname "$CONVERTERS")"
  rm -rf "$CONVERTERS"
  mv "$tmp/$top" "$CONVERTERS"
  rm -rf "$tmp"
fi

"$PY" - <<'EOF'
import llama_cpp
print(f"llama-cpp-python {llama_cpp.__version__} installed:", llama_cpp.llama_print_system_info().decode().strip())
EOF
