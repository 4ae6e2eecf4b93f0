//! Figures as PNG and SVG. Each figure is a [`Figure`]: drawn once per backend through the same
//! code, with text in the embedded DejaVu Sans (registered with plotters' `ab_glyph` renderer),
//! so images look the same on every machine, fonts installed or not.
//!
//! The entry points write `<base>.png` and `<base>.svg`: [`trajectories::plot_trajectories`],
//! [`heatmap::plot_convergence`], [`histogram::plot_exit_histogram`],
//! [`depth::plot_depth_curves`], [`compute::plot_accuracy_against_compute`] and
//! [`training::plot_training_curves`].

pub mod colorbar;
pub mod compute;
pub mod depth;
pub mod heatmap;
pub mod histogram;
pub mod training;
pub mod trajectories;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Serialize;

use crate::{AnalysisError, with_suffix};

/// DejaVu Sans 2.37 (Bitstream Vera license, see `assets/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The family every text style names; bold and italic fall back to the one embedded face.
const FAMILY: &str = "sans-serif";

/// A figure that can be drawn on any plotters backend.
pub trait Figure {
    /// Width and height in pixels (the SVG uses the same user units).
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError>;
}

/// Why drawing failed (a backend error, as text: the two backends' error types differ).
#[derive(Debug)]
pub struct DrawError(pub String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        DrawError(e.to_string())
    }
}

/// The two files of a saved figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Images {
    pub png: PathBuf,
    pub svg: PathBuf,
}

/// Draws `figure` into `<base>.png` and `<base>.svg`, creating `base`'s directory if needed.
pub fn save(figure: &impl Figure, base: &Path) -> Result<Images, AnalysisError> {
    register_font()?;
    crate::store::create_parent(base)?;
    let images = Images {
        png: with_suffix(base, ".png"),
        svg: with_suffix(base, ".svg"),
    };
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: DrawError| AnalysisError::Plot { path, reason: e.0 }
    };
    {
        let root = BitMapBackend::new(&images.png, figure.size()).into_drawing_area();
        paint(figure, &root).map_err(failed(&images.png))?;
    }
    {
        let root = SVGBackend::new(&images.svg, figure.size()).into_drawing_area();
        paint(figure, &root).map_err(failed(&images.svg))?;
    }
    Ok(images)
}

/// Draws `figure` into memory: `width · height · 3` bytes of RGB (for checks of what a figure
/// shows without going through files).
pub fn render(figure: &impl Figure) -> Result<Vec<u8>, AnalysisError> {
    register_font()?;
    let (w, h) = figure.size();
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        paint(figure, &root).map_err(|e| AnalysisError::Plot {
            path: PathBuf::from("<memory>"),
            reason: e.0,
        })?;
    }
    Ok(pixels)
}

fn paint<DB: DrawingBackend>(figure: &impl Figure, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
    root.fill(&WHITE)?;
    figure.draw(root)?;
    root.present()?;
    Ok(())
}

fn register_font() -> Result<(), AnalysisError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err(AnalysisError::Invalid(
            "the embedded DejaVu Sans does not parse".to_string(),
        ))
    }
}

/// Text in the embedded face.
pub(crate) fn text(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

/// Dark to bright for `fraction` in `[0, 1]` (viridis): iterations, depths, log distances.
pub(crate) fn sequential(fraction: f64) -> RGBColor {
    ViridisRGB.get_color(fraction.clamp(0.0, 1.0) as f32)
}

/// Distinct colours for unordered series (Tableau 10).
pub(crate) fn categorical(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    COLOURS[i % COLOURS.len()]
}

/// A tick label with at most three significant digits and no trailing zeros (`0.6`, `3`,
/// `0.0125`), where plotters' default prints floats' full expansion on log axes.
pub(crate) fn tick(v: &f64) -> String {
    if *v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// `[lo, hi]` widened by 5% on each side (and to a unit interval around a single value), so
/// that points on the edge stay visible.
pub(crate) fn padded(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}
