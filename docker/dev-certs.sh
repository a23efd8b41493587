#!/usr/bin/env bash
# Development TLS material and tokens for docker/compose.yaml (and for trying TLS locally).
# NOT for production: the CA key sits next to the certificates.
#
#   docker/dev-certs.sh [DIR]        # default DIR: docker/dev-certs (git-ignored)
#
# Writes, with the openssl command line:
#   ca.pem, ca-key.pem           a development CA (EC P-256, 1 year)
#   server.pem, server-key.pem   the engine's certificate, SANs: localhost, engine, 127.0.0.1, ::1
#   client.pem, client-key.pem   a client certificate for mTLS (--tls-client-ca ca.pem)
#   jwt-secret                   a random HS256 secret (--jwt-secret-file)
#   token-admin, token-user-1    example tokens (1 h), minted with `spendflow token` when a
#                                spendflow binary is found (SPENDFLOW_BIN, PATH or target/debug)
# Existing files are kept (delete DIR to start over), so tokens can be minted again with the
# same secret. Keys and the secret are owner-only (0600); the directory is 0755 so the
# container's user (uid 10001) can read the certificates, and the keys are made readable to it
# by group 10001 when run as root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-$here/dev-certs}
days=365
command -v openssl >/dev/null || { echo "dev-certs: openssl is needed" >&2; exit 1; }
mkdir -p "$dir"
chmod 0755 "$dir"
cd "$dir"
umask 077

if [[ ! -f ca.pem ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
  openssl req -x509 -new -key ca-key.pem -sha256 -days "$days" -subj "/CN=spendflow development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem
  echo "dev-certs: made the CA: $dir/ca.pem"
fi

# leaf NAME CN EXTENSIONS: a key (PKCS#8) and a certificate signed by the CA.
leaf() {
  local name=$1 cn=$2 ext=$3
  [[ -f $name.pem ]] && return 0
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name-key.pem"
  openssl req -new -key "$name-key.pem" -subj "/CN=$cn" -out "$name.csr"
  printf '%s\n' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
    -days "$days" -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  echo "dev-certs: made $dir/$name.pem"
}

# clientAuth too: in a cluster with mTLS, each process presents its server certificate when it
# forwards a query to a peer.
leaf server engine "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:localhost,DNS:engine,IP:127.0.0.1,IP:::1"
leaf client spendflow-client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

if [[ ! -f jwt-secret ]]; then
  openssl rand -hex 32 | tr -d '\n' >jwt-secret
  echo "dev-certs: made $dir/jwt-secret"
fi

chmod 0644 ca.pem server.pem client.pem
chmod 0600 ca-key.pem server-key.pem client-key.pem jwt-secret
if [[ $(id -u) == 0 ]]; then
  # The engine's container runs as uid/gid 10001: let it read its key and the secret.
  chgrp 10001 server-key.pem jwt-secret && chmod 0640 server-key.pem jwt-secret
fi

bin=${SPENDFLOW_BIN:-}
if [[ -z $bin ]]; then
  if command -v spendflow >/dev/null; then
    bin=$(command -v spendflow)
  elif [[ -x $here/../target/debug/spendflow ]]; then
    bin=$here/../target/debug/spendflow
  fi
fi
mint() {
  local file=$1
  shift
  if [[ -n $bin ]] && "$bin" token --jwt-secret-file jwt-secret "$@" --ttl 1h >"$file.tmp" 2>/dev/null; then
    mv "$file.tmp" "$file"
    echo "dev-certs: wrote $dir/$file (valid 1 h)"
  else
    rm -f "$file.tmp"
    echo "dev-certs: mint $file with: spendflow token --jwt-secret-file $dir/jwt-secret $(printf '%q ' "$@")--ttl 1h"
  fi
}
mint token-admin --sub 0 --scope "admin expenses:read personnel:read"
mint token-user-1 --sub 1 --scope "expenses:read:self personnel:read personnel:write"

cat <<EOF

Try (with docker compose up, or an engine started with --tls-cert $dir/server.pem --tls-key $dir/server-key.pem):
  grpcurl -cacert $dir/ca.pem -H "authorization: Bearer \$(cat $dir/token-admin)" 127.0.0.1:50051 spendflow.v1.Admin/GetStatus
  curl --cacert $dir/ca.pem -H "authorization: Bearer \$(cat $dir/token-user-1)" https://localhost:8080/api/users/1
mTLS: add --tls-client-ca $dir/ca.pem to the engine, and -cert $dir/client.pem -key $dir/client-key.pem to grpcurl
(curl: --cert $dir/client.pem --key $dir/client-key.pem).
EOF
