#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary (for `asr lm`) into DEST (default .venv/bin) from the kenlm
# source distribution on PyPI. Needs cmake, g++ and the Boost/zlib/bz2/lzma headers (`make apt`).
# About 40 s on 2 cores; does nothing if both tools are already there.
set -euo pipefail
dest=$(realpath -m "${1:-.venv/bin}")
version=0.3.0
if [ -x "$dest/lmplz" ] && [ -x "$dest/build_binary" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps -d "$work" "kenlm==$version"  # an sdist: kenlm has no wheels
tar -xzf "$work/kenlm-$version.tar.gz" -C "$work"
cmake -S "$work/kenlm-$version" -B "$work/build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build" --target lmplz build_binary -j "$(nproc)" >/dev/null
mkdir -p "$dest"
cp "$work/build/bin/lmplz" "$work/build/bin/build_binary" "$dest/"
echo "built KenLM $version: $dest/lmplz $dest/build_binary"
