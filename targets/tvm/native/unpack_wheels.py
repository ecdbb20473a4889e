"""Unpack the TVM runtime (libraries + C++ headers) from apache-tvm / apache-tvm-ffi wheels.

    python unpack_wheels.py DEST WHEEL...

Only what edgemoe-rt builds and runs against is extracted (libtvm_runtime.so,
libtvm_runtime_extra.so, libtvm_ffi.so, tvm/include, tvm_ffi/include), never the compiler library.
"""

import sys
import zipfile

LIBS = ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so", "tvm_ffi/lib/libtvm_ffi.so")
HEADERS = ("tvm/include/", "tvm_ffi/include/")


def main(dest: str, wheels: list[str]) -> None:
    """Extract the runtime libraries and headers of ``wheels`` under ``dest`` (exit if a library is missing)."""
    found = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name in LIBS or name.startswith(HEADERS):
                    z.extract(name, dest)
                    found.add(name)
    missing = [lib for lib in LIBS if lib not in found]
    if missing:
        sys.exit(f"unpack_wheels: not in the wheels: {', '.join(missing)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
