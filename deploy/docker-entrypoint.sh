#!/bin/sh
# Entry point of Conveyor's images: `docker run conveyor/registry` runs
# `conveyor serve registry --listen 0.0.0.0:50051` (the target's CMD); any
# other arguments run that `conveyor` command instead.
#
# With the Vault Agent injector (deploy/k8s: vault.hashicorp.com/agent-inject-token)
# the agent writes its Vault token to /vault/secrets/token. Conveyor reads its
# Vault credentials from CONVEYOR_SECRETS_VAULT_TOKEN (or AppRole), so the
# token is handed over here unless credentials were given explicitly. The
# Kubernetes auth role should issue periodic tokens (token_period): the
# service renews its token itself for as long as it runs.
set -eu
if [ -z "${CONVEYOR_SECRETS_VAULT_TOKEN:-}" ] && [ -z "${CONVEYOR_SECRETS_VAULT_ROLE_ID:-}" ] \
    && [ -r /vault/secrets/token ]; then
    CONVEYOR_SECRETS_VAULT_TOKEN="$(cat /vault/secrets/token)"
    export CONVEYOR_SECRETS_VAULT_TOKEN
fi
exec conveyor "$@"
