//! cuBLASLt GEMM (filled below).
