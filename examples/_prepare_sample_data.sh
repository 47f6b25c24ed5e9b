# Shared data step of examples/quickstart.sh, compare_losses.sh and sweep_gamma.sh (sourced, not run):
# preprocess the embedded sample corpus (data/sample, Pile format) into one dataset per Pile domain, once,
# and blend the domains with the MiLe paper's Pile sampling weights.
# Needs: DATA_DIR (output folder), the working directory at the repository root, the venv's python on PATH.
# Sets:  TOKENIZER        the tokenizer flags (array)
#        DATA_PATH        the --data-path blend of the training domains (array)
#        VALID_DATA_PATH  with PREPARE_VALIDATION=1: the held-out data/sample/val.jsonl.zst, one dataset
#                         prefix per domain (array, for tools/eval_token_buckets.py --valid-data-path)
TOKENIZER=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/sample/tokenizer.json)
mkdir -p "$DATA_DIR"

_prepare_by_domain() {  # NAME INPUT: $DATA_DIR/NAME_<Domain>_text_document.bin/.idx, unless already there
  if ! ls "$DATA_DIR/$1"_*_text_document.idx >/dev/null 2>&1; then
    python tools/preprocess_data.py --input "$2" --output-prefix "$DATA_DIR/$1" \
      --split-by-domain --append-eod --workers 2 "${TOKENIZER[@]}"
  else
    echo "   (reusing $DATA_DIR/$1_*)"
  fi
}

_prepare_by_domain sample data/sample/train.jsonl.zst
read -r -a DATA_PATH <<< "$(python tools/pile_blend.py --output-prefix "$DATA_DIR/sample")"
echo "   --data-path ${DATA_PATH[*]}"
if [ "${PREPARE_VALIDATION:-0}" = 1 ]; then
  _prepare_by_domain val data/sample/val.jsonl.zst
  VALID_DATA_PATH=()
  for index_file in "$DATA_DIR"/val_*_text_document.idx; do VALID_DATA_PATH+=("${index_file%.idx}"); done
  echo "   held-out validation: ${VALID_DATA_PATH[*]}"
fi
