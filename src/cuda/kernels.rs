//! Kernel images (filled below).
