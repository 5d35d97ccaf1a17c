"""A multi-node Ray cluster on this machine, for the job's multi-node test (run as a process).

``python tests/multinode_cluster.py TEMP_DIR`` starts a head node (no CPUs: the driver only) and
two worker nodes, ``w1`` and ``w2``, each with 2 CPUs and 2 (fake) GPUs, all on 127.0.0.1, with
Ray's files under TEMP_DIR; prints one JSON line ``{"address", "nodes": {name: node id}}``; then
reads commands from stdin: ``remove NAME`` kills that node's processes (its raylet, object store
and workers: a node lost) and prints ``removed NAME``. End of input shuts the cluster down.

It runs apart from the test process: that process already holds the session's own Ray, and
``ray.cluster_utils.Cluster`` keeps process-wide state.
"""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    temp_dir = sys.argv[1]
    common = {"node_ip_address": "127.0.0.1", "temp_dir": temp_dir,
              "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**common, "num_cpus": 0, "include_dashboard": False})
    nodes = {name: cluster.add_node(**common, num_cpus=2, num_gpus=2) for name in ("w1", "w2")}
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address,
                      "nodes": {name: node.node_id for name, node in nodes.items()}}), flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if len(command) == 2 and command[0] == "remove":
                cluster.remove_node(nodes.pop(command[1]), allow_graceful=False)
                print(f"removed {command[1]}", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
