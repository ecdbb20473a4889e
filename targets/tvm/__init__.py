"""Apache TVM backend (Relax): partitions compiled to shared libraries run by a Relax VirtualMachine.

Executors: ``tvm`` (in this process) and ``tvm-rpc`` (graphs on a board over TVM RPC, see :mod:`.remote`).
"""

TARGET = "target:TARGET"
EXECUTORS = {"tvm": "executor:TvmExecutor", "tvm-rpc": "remote:RemoteExecutor"}
