//! A vertical colour bar: the key to a colour-coded quantity (iteration, log distance).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{DrawError, text};

/// Draws a bar over `range` into `area`, coloured by `colour(value)`, its scale on the right
/// formatted by `format` and titled `label` (reading upwards, beside the scale). The `margins`
/// (top, bottom) line it up with the plotting area of the chart beside it. `ticks` puts the
/// scale's ticks at those values (in the bar's own units); `None` lets plotters choose about six.
pub(crate) fn draw_colorbar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    range: (f64, f64),
    label: &str,
    margins: (u32, u32),
    ticks: Option<&[f64]>,
    colour: impl Fn(f64) -> RGBColor,
    format: impl Fn(&f64) -> String,
) -> Result<(), DrawError> {
    let (lo, hi) = if range.1 > range.0 {
        range
    } else {
        (range.0 - 0.5, range.0 + 0.5)
    };
    let mut chart = ChartBuilder::on(area)
        .margin_top(margins.0)
        .margin_bottom(margins.1)
        .margin_left(8)
        .margin_right(24)
        .right_y_label_area_size(56)
        .build_cartesian_2d(0f64..1f64, lo..hi)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(if ticks.is_some() { 0 } else { 6 })
        .y_label_formatter(&format)
        .label_style(text(12.0))
        .draw()?;
    const STEPS: usize = 128;
    chart.draw_series((0..STEPS).map(|i| {
        let a = lo + (hi - lo) * i as f64 / STEPS as f64;
        let b = lo + (hi - lo) * (i + 1) as f64 / STEPS as f64;
        Rectangle::new([(0.0, a), (1.0, b)], colour((a + b) / 2.0).filled())
    }))?;
    chart.draw_series(std::iter::once(Rectangle::new(
        [(0.0, lo), (1.0, hi)],
        BLACK.stroke_width(1),
    )))?;
    // Chosen ticks: a mark on the bar's right edge and the value beside it, as the mesh's own.
    for &t in ticks.unwrap_or_default().iter().filter(|t| (lo..=hi).contains(*t)) {
        let style = text(12.0).pos(Pos::new(HPos::Left, VPos::Center));
        chart.plotting_area().draw(
            &(EmptyElement::at((1.0, t))
                + PathElement::new(vec![(0, 0), (5, 0)], BLACK.stroke_width(1))
                + Text::new(format(&t), (9, 0), style)),
        )?;
    }
    let (width, height) = area.dim_in_pixel();
    let style = text(13.0)
        .transform(FontTransform::Rotate270)
        .pos(Pos::new(HPos::Center, VPos::Center));
    let middle = (margins.0 as i32 + height as i32 - margins.1 as i32) / 2;
    area.draw_text(label, &style, (width as i32 - 12, middle))?;
    Ok(())
}
