//! Decoding one source image into the cache's square RGB form, or saying why it cannot be used.
//!
//! The format is guessed from the file's content, not its extension (a PNG named `.jpg` loads). Grayscale, CMYK
//! and progressive JPEGs load as RGB. JPEG decoders pad a truncated scan with grey instead of failing, so every
//! JPEG is first walked marker by marker ([`jpeg_truncation`]): a file whose last scan is not followed by an EOI
//! marker (`FF D9`) is rejected as truncated.

use image::{ImageFormat, ImageReader, RgbImage, imageops};
use std::io::Cursor;

/// Decodes `bytes` as an RGB image; the error is the exclusion reason shown to the user.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file".to_string());
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("unreadable image: {e}"))?;
    let format = reader.format().ok_or_else(|| "undecodable image: unknown format".to_string())?;
    if format == ImageFormat::Jpeg {
        jpeg_truncation(bytes).map_err(|e| format!("truncated or corrupt JPEG: {e}"))?;
    }
    let img = reader.decode().map_err(|e| format!("undecodable image ({format:?}): {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has zero width or height".to_string());
    }
    Ok(img.into_rgb8())
}

/// Walks a JPEG's marker segments and entropy-coded scans; `Ok` when the stream ends with an EOI marker.
///
/// Bytes after EOI (some cameras append data) are allowed. An EOI inside an embedded thumbnail does not count:
/// segments are skipped by their length, so only a top-level EOI ends the walk.
pub fn jpeg_truncation(b: &[u8]) -> Result<(), String> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("missing SOI marker".to_string());
    }
    let mut i = 2;
    let mut scans = 0usize;
    loop {
        // Skip fill bytes before a marker.
        while i < b.len() && b[i] == 0xFF && i + 1 < b.len() && b[i + 1] == 0xFF {
            i += 1;
        }
        if i + 1 >= b.len() {
            return Err(format!("no EOI marker after {scans} scan(s)"));
        }
        if b[i] != 0xFF {
            return Err(format!("expected a marker at byte {i}"));
        }
        let marker = b[i + 1];
        i += 2;
        match marker {
            0xD9 => return if scans > 0 { Ok(()) } else { Err("no image scan before EOI".to_string()) },
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                if i + 2 > b.len() {
                    return Err(format!("segment length of marker FF{marker:02X} cut off"));
                }
                let len = usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
                if len < 2 || i + len > b.len() {
                    return Err(format!("segment FF{marker:02X} at byte {} runs past the end of the file", i - 2));
                }
                i += len;
                if marker == 0xDA {
                    scans += 1;
                    // Entropy-coded data: runs until a marker other than stuffed FF00 or a restart marker.
                    loop {
                        if i + 1 >= b.len() {
                            return Err(format!("scan {scans} runs to the end of the file (no EOI marker)"));
                        }
                        if b[i] == 0xFF {
                            let n = b[i + 1];
                            if n == 0x00 || (0xD0..=0xD7).contains(&n) {
                                i += 2;
                                continue;
                            }
                            if n != 0xFF {
                                break;
                            }
                        }
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Center-crops `img` to a square of its shorter side and resizes it to `size`×`size` (triangle filter, which
/// is bilinear when enlarging and antialiased when shrinking), returning HWC RGB bytes.
///
/// Cropping first then resizing equals torchvision's `Resize(size)` + `CenterCrop(size)` up to the sub-pixel
/// rounding of the crop box, and decodes and filters only the pixels that are kept.
pub fn square_resize(img: &RgbImage, size: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let m = w.min(h);
    let (x0, y0) = ((w - m) / 2, (h - m) / 2);
    let view = imageops::crop_imm(img, x0, y0, m, m);
    if m == size {
        return view.to_image().into_raw();
    }
    imageops::resize(&*view, size, size, imageops::FilterType::Triangle).into_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, codecs::jpeg::JpegEncoder};

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let px: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90).write_image(&px, w, h, image::ExtendedColorType::Rgb8).unwrap();
        out
    }

    #[test]
    fn complete_jpeg_passes_and_every_truncation_fails() {
        let full = jpeg(40, 30);
        assert!(jpeg_truncation(&full).is_ok());
        assert!(decode_rgb(&full).is_ok());
        // Trailing bytes after EOI are fine.
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"trailer");
        assert!(jpeg_truncation(&trailing).is_ok());
        for cut in [full.len() - 2, full.len() - 1, full.len() / 2, 300, 20, 3] {
            assert!(jpeg_truncation(&full[..cut]).is_err(), "cut at {cut}");
            assert!(decode_rgb(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn progressive_and_restart_marker_jpegs_walk_to_eoi() {
        let (w, h) = (33u16, 17u16);
        let px: Vec<u8> = (0..usize::from(w) * usize::from(h) * 3).map(|i| (i * 13 % 256) as u8).collect();
        for (progressive, restart) in [(true, None), (false, Some(2u16)), (true, Some(1))] {
            let mut out = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut out, 85);
            enc.set_progressive(progressive);
            if let Some(r) = restart {
                enc.set_restart_interval(r);
            }
            enc.encode(&px, w, h, jpeg_encoder::ColorType::Rgb).unwrap();
            assert!(jpeg_truncation(&out).is_ok(), "progressive {progressive} restart {restart:?}");
            let img = decode_rgb(&out).unwrap();
            assert_eq!(img.dimensions(), (33, 17));
            for cut in [out.len() - 2, out.len() * 2 / 3, out.len() / 3] {
                assert!(decode_rgb(&out[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn empty_and_garbage_are_rejected() {
        assert_eq!(decode_rgb(&[]).unwrap_err(), "empty file");
        assert!(decode_rgb(b"this is not an image at all").is_err());
    }

    #[test]
    fn png_content_loads_whatever_the_name() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        let back = decode_rgb(out.get_ref()).unwrap();
        assert_eq!(back, img);
    }

    #[test]
    fn square_resize_identity_and_crop() {
        // 6x4 image: the centre 4x4 square is columns 1..5.
        let img = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8, y as u8, (x * y) as u8]));
        let out = square_resize(&img, 4);
        for y in 0..4u32 {
            for x in 0..4u32 {
                let i = ((y * 4 + x) * 3) as usize;
                assert_eq!(&out[i..i + 3], &[(x + 1) as u8, y as u8, ((x + 1) * y) as u8]);
            }
        }
        // A constant image stays constant under any resize.
        let flat = RgbImage::from_pixel(9, 13, image::Rgb([10, 200, 33]));
        let out = square_resize(&flat, 5);
        assert_eq!(out.len(), 75);
        assert!(out.chunks(3).all(|p| p == [10, 200, 33]));
    }
}
