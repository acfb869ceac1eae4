# Source at the start of every command on the GPU machine (device tool):
#   source scripts/device_env.sh
# Installs the carried wheels (.whl, from ../shared/tools/device-wheels.sh) and unpacks the carried
# TTS engines (.tts, from ../shared/tools/device-tts.sh) once per machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -f .tts/tts.tar.xz ] && [ ! -x /tmp/tts/bin/espeak-ng ]; then
  mkdir -p /tmp/tts && tar -xJf .tts/tts.tar.xz -C /tmp/tts
fi
export PATH=/tmp/tts/bin:$PATH LD_LIBRARY_PATH=/tmp/tts/lib:${LD_LIBRARY_PATH:-} ESPEAK_DATA_PATH=/tmp/tts
