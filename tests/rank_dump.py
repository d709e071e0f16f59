"""train.py, after which each rank has written RANK_DUMP_DIR/<rank>.json: its torchrun node
(GROUP_RANK), local rank and the ranks of the tensor-parallel group that parallel.make_mesh
built for it (test_multinode.py checks that those groups stay inside a node)."""
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed as dist  # noqa: E402

import parallel  # noqa: E402  (train.py imports this same module, so it runs the wrapped make_mesh)

make_mesh = parallel.make_mesh


def dumping_make_mesh(world, rank, dp, pp, tp):
    mesh = make_mesh(world, rank, dp, pp, tp)
    rec = {"rank": rank, "node": int(os.environ["GROUP_RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
           "tp_group": dist.get_process_group_ranks(mesh.tp_group) if mesh.tp_group is not None else [rank]}
    with open(os.path.join(os.environ["RANK_DUMP_DIR"], f"{rank}.json"), "w") as f:
        json.dump(rec, f)
    return mesh


parallel.make_mesh = dumping_make_mesh
sys.argv = [os.path.join(ROOT, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
