#!/usr/bin/env python3
"""Make a local CA, the coordinator's TLS certificate and (optionally) node keys, for tests and first deployments.

    python scripts/make_certs.py --out certs --host coordinator.example.org --host 10.0.0.5 --node eu-1 --node us-1

Writes certs/ca.crt, ca.key, server.crt, server.key and certs/nodes/<name>{,.pub}. Production
deployments use their own CA; fedsov only needs ca.crt/server.crt/server.key in one folder.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.credentials import make_certificates, make_node_key
from common.errors import FedsovError

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--host", action="append", help="a name or IP clients use to reach the coordinator (repeat)")
parser.add_argument("--node", action="append", default=[], help="make a node key pair with this name (repeat)")
parser.add_argument("--force", action="store_true", help="replace an existing CA and server certificate")
args = parser.parse_args()
try:
    files = make_certificates(args.out, args.host or ["localhost", "127.0.0.1"], force=args.force)
    print(f"CA certificate: {files.ca_cert}\nServer certificate and key: {files.server_cert}, {files.server_key}")
    for name in args.node:
        private, public = make_node_key(args.out / "nodes" / name)
        print(f"Node {name}: private key {private}, public key {public} (register it with the coordinator)")
except FedsovError as err:
    sys.exit(f"make_certs.py: error: {err}")
