//! `chart.svg`: throughput (top) and p99 latency (bottom) over time, one
//! line per target, rounds laid end to end on the x axis with a dashed line
//! between them, so a dip in any round stands out at a glance.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

const SIZE: (u32, u32) = (1000, 700);

/// Draws `report`'s timelines into an SVG file at `path`.
pub fn write(report: &Report, path: &Path) -> anyhow::Result<()> {
    let round_s = report.settings.duration.as_secs_f64();
    let rounds = report.settings.rounds;
    // (x, y) series per target: x is seconds since the first round began.
    let series = |value: fn(&crate::report::Point) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        report
            .targets
            .iter()
            .map(|t| {
                let points = t
                    .rounds
                    .iter()
                    .flat_map(|r| {
                        let offset = (r.round - 1) as f64 * round_s;
                        r.timeline.iter().map(move |p| (offset + p.t_s, value(p)))
                    })
                    .collect();
                (t.name.clone(), points)
            })
            .collect()
    };
    let throughput = series(|p| p.ops_per_s);
    let p99 = series(|p| p.p99_ms);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    let x_max = round_s * rounds as f64;
    let x_label = if rounds > 1 {
        format!("seconds ({rounds} rounds of {round_s}s end to end)")
    } else {
        "seconds".to_owned()
    };
    panel(
        &top,
        "throughput",
        "ops/s",
        &x_label,
        x_max,
        rounds,
        round_s,
        &throughput,
    )?;
    panel(
        &bottom,
        "p99 latency",
        "ms",
        &x_label,
        x_max,
        rounds,
        round_s,
        &p99,
    )?;
    root.present().map_err(draw_error)?;
    Ok(())
}

/// One chart: a line per target plus round separators.
#[allow(clippy::too_many_arguments)] // one call per panel; a struct would only rename them
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    x_label: &str,
    x_max: f64,
    rounds: u32,
    round_s: f64,
    lines: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let y_max = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(draw_error)?;
    for r in 1..rounds {
        let x = r as f64 * round_s;
        chart
            .draw_series(DashedLineSeries::new(
                [(x, 0.0), (x, y_max)],
                4,
                4,
                BLACK.mix(0.4).into(),
            ))
            .map_err(draw_error)?;
    }
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

/// plotters' errors borrow the backend's; keep their text.
fn draw_error<E: std::error::Error>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}
