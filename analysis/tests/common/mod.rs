//! Helpers of the integration tests: image checks.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};

/// Decodes a PNG file: `(width, height, RGB pixels)`.
pub fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    pixels.truncate(info.buffer_size());
    (info.width, info.height, pixels)
}

/// Asserts that RGB `pixels` show something: a fair share of non-white pixels, many colours,
/// and a real spread of brightness.
pub fn assert_drawn(pixels: &[u8], what: &str) {
    let n = pixels.len() / 3;
    let px = |i: usize| (pixels[3 * i], pixels[3 * i + 1], pixels[3 * i + 2]);
    let inked = (0..n).filter(|&i| px(i) != (255, 255, 255)).count();
    assert!(inked * 50 > n, "{what}: only {inked} of {n} pixels drawn");
    let mut colours: Vec<(u8, u8, u8)> = (0..n).map(px).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 20, "{what}: only {} colours", colours.len());
    let brightness: Vec<f64> = (0..n)
        .map(|i| pixels[3 * i..3 * i + 3].iter().map(|&c| c as f64).sum::<f64>() / 3.0)
        .collect();
    let mean = brightness.iter().sum::<f64>() / n as f64;
    let variance = brightness.iter().map(|b| (b - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(variance > 100.0, "{what}: brightness variance {variance}");
}

/// Whether RGB `pixels` contain `colour` exactly.
pub fn contains_colour(pixels: &[u8], colour: (u8, u8, u8)) -> bool {
    pixels.chunks_exact(3).any(|p| (p[0], p[1], p[2]) == colour)
}

/// Checks a saved figure: both files, the PNG decodable at `size`, showing something; returns
/// the SVG text.
pub fn check_saved(base: &Path, size: (u32, u32)) -> String {
    let png = PathBuf::from(format!("{}.png", base.display()));
    let svg = PathBuf::from(format!("{}.svg", base.display()));
    let (w, h, pixels) = decode_png(&png);
    assert_eq!((w, h), size, "{}", png.display());
    assert_drawn(&pixels, &png.display().to_string());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
        "{}",
        svg.display()
    );
    text
}

/// The text of every `<text>` element of an SVG, trimmed.
pub fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}
