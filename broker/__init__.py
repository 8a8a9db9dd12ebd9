# Before anything imports grpc: its C core picks its I/O engine once, at import (see imgsearch.grpc_core).
from imgsearch.grpc_core import prefer_iomgr

prefer_iomgr()
