#!/usr/bin/env bash
# Start a local S3-compatible server (moto, installed with `pip install -e ".[test]"`) in the foreground.
#   infra/local/start-s3.sh                  # http://127.0.0.1:9000; Ctrl-C stops it
#   S3_PORT=9100 infra/local/start-s3.sh
# Then, in another shell (moto accepts any credentials):
#   export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
#   python -c "import s3fs; s3fs.S3FileSystem().mkdir('maskdiet-data')"
#   maskdiet demo-data s3://maskdiet-data/train --bad 10
# Objects live in memory: they are gone when the server stops.
set -euo pipefail

S3_HOST="${S3_HOST:-127.0.0.1}"
S3_PORT="${S3_PORT:-9000}"
echo "S3 endpoint: http://${S3_HOST}:${S3_PORT}"
echo "  export AWS_ENDPOINT_URL=http://${S3_HOST}:${S3_PORT} AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local"
exec moto_server -H "${S3_HOST}" -p "${S3_PORT}"
