"""FPGA backend: a Vitis HLS accelerator per bundle (``--target hls``), run by the ``fpga`` executor.

The compiler side lowers an M³ViT-style model to a parametrised HLS design (:mod:`.lower`,
:mod:`.quantize`, :mod:`.project`, :mod:`.estimate`, :mod:`.target`); the runtime side drives it
(:mod:`.executor`) through the C simulation (:mod:`.csim`) or PYNQ on a Zynq board
(:mod:`.pynq_driver`); :mod:`.emulate` is the bit-exact numpy model of its arithmetic.
"""

TARGET = "target:TARGET"
EXECUTORS = {"fpga": "executor:FpgaExecutor"}
