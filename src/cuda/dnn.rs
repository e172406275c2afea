//! cuDNN convolutions (filled below).
