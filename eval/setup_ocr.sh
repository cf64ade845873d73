#!/usr/bin/env bash
# Install Tesseract OCR and the language packs the text-preservation suite reads (English, German, French, Greek,
# Russian). Debian/Ubuntu; needs root (run with sudo otherwise). Called by `vtok eval tokenizer --install-ocr`.
set -euo pipefail

PACKAGES=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-deu tesseract-ocr-fra tesseract-ocr-ell tesseract-ocr-rus)

if command -v tesseract >/dev/null 2>&1; then
  installed="$(tesseract --list-langs 2>/dev/null || true)"
  missing=()
  for lang in eng deu fra ell rus; do
    grep -qx "$lang" <<<"$installed" || missing+=("tesseract-ocr-$lang")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "tesseract and all language packs are already installed: $(tesseract --version 2>&1 | head -1)"
    exit 0
  fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get not found: install Tesseract 5 and the eng/deu/fra/ell/rus language data with your package manager" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PACKAGES[@]}"
tesseract --version 2>&1 | head -1
tesseract --list-langs
