//! The charts beside the tables of docs/benchmarks.md, drawn from the
//! figures the run just printed (plotters, SVG backend: no fonts or system
//! libraries; text is left to the viewer's sans-serif). A chart whose
//! figures the run did not take is not written, so that a partial run
//! leaves the others as they were.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::latency::Latency;
use crate::measure::summary;
use crate::report::{Results, Via, slot};

const SIZE: (u32, u32) = (720, 420);
const FONT: &str = "sans-serif";
const COLOURS: [RGBColor; 3] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
];

type Drawn = Result<(), String>;

fn failed(e: impl std::fmt::Display) -> String {
    format!("drawing a chart: {e}")
}

/// Draws every chart the results allow into `dir`; the files written.
pub fn draw(dir: &Path, results: &Results, latency: Option<&Latency>) -> Vec<PathBuf> {
    let _ = std::fs::create_dir_all(dir);
    let mut written = Vec::new();
    let mut attempt = |name: &str, draw: &dyn Fn(&Path) -> Option<Drawn>| {
        let path = dir.join(name);
        match draw(&path) {
            Some(Ok(())) => written.push(path),
            Some(Err(e)) => eprintln!("bench: {}: {e}", path.display()),
            None => {}
        }
    };
    if let Some(l) = latency {
        attempt("login-latency.svg", &|p| Some(login_latency(p, l)));
    }
    attempt("throughput-ratio.svg", &|p| throughput_ratio(p, results));
    attempt("idle-rss.svg", &|p| idle_rss(p, results));
    written
}

/// Bars of p50 per path, with a tick at p99, for the login and the first
/// FETCH byte.
fn login_latency(path: &Path, l: &Latency) -> Drawn {
    let groups = [
        ("login (connect → OK)", l.quantiles(|c| c.login)),
        ("first FETCH byte", l.quantiles(|c| c.first_fetch_byte)),
    ];
    let top = groups
        .iter()
        .flat_map(|(_, q)| q.iter().filter_map(|(_, p99)| *p99))
        .fold(1.0f64, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let caption = format!(
        "Login over a {:.0} ms round trip: p50 bars, p99 ticks (ms)",
        l.rtt_ms
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..8f64, 0f64..top)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(0)
        .x_labels(0)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("ms")
        .draw()
        .map_err(failed)?;
    for (g, (label, q)) in groups.iter().enumerate() {
        let x0 = 0.5 + g as f64 * 4.0;
        for (i, (p50, p99)) in q.iter().enumerate() {
            let Some(p50) = p50 else { continue };
            let x = x0 + i as f64;
            let colour = COLOURS[i];
            chart
                .draw_series([Rectangle::new([(x, 0.0), (x + 0.8, *p50)], colour.filled())])
                .map_err(failed)?;
            chart
                .draw_series([Text::new(
                    format!("{p50:.0}"),
                    (x + 0.1, p50 + top * 0.03),
                    (FONT, 13),
                )])
                .map_err(failed)?;
            if let Some(p99) = p99 {
                chart
                    .draw_series([PathElement::new(
                        vec![(x + 0.2, *p99), (x + 0.6, *p99)],
                        BLACK.stroke_width(2),
                    )])
                    .map_err(failed)?;
            }
        }
        chart
            .draw_series([Text::new(label.to_string(), (x0, -top * 0.05), (FONT, 14))])
            .map_err(failed)?;
    }
    legend(&mut chart, &crate::latency::NAMES, top)?;
    root.present().map_err(failed)
}

/// A legend in the top left corner: a swatch and a name per path.
fn legend<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    names: &[&str],
    top: f64,
) -> Drawn {
    for (i, name) in names.iter().enumerate() {
        let y = top * (0.95 - 0.07 * i as f64);
        chart
            .draw_series([Rectangle::new(
                [(0.2, y), (0.5, y - top * 0.04)],
                COLOURS[i].filled(),
            )])
            .map_err(|e| failed(e.to_string()))?;
        chart
            .draw_series([Text::new(name.to_string(), (0.6, y), (FONT, 13))])
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(())
}

/// proxy ÷ direct per transfer (median, min–max whisker), against the target.
fn throughput_ratio(path: &Path, r: &Results) -> Option<Drawn> {
    let ours = slot(Via::Ours);
    let transfers = [
        ("IMAP FETCH", &r.fetch[ours].paired_direct),
        ("IMAP APPEND", &r.append[ours].paired_direct),
        ("SMTP DATA", &r.smtp[ours].paired_direct),
    ];
    let measured: Vec<_> = transfers
        .iter()
        .filter_map(|(name, ratios)| Some((*name, summary(ratios)?)))
        .collect();
    if measured.is_empty() {
        return None;
    }
    Some((|| {
        let top = measured.iter().map(|(_, s)| s.max).fold(1.2f64, f64::max) * 1.1;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Throughput through the proxy ÷ direct (median, min–max), stand-in",
                (FONT, 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..(measured.len() as f64 * 2.0), 0f64..top)
            .map_err(failed)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(0)
            .x_labels(0)
            .y_desc("proxy ÷ direct")
            .draw()
            .map_err(failed)?;
        for (i, (name, s)) in measured.iter().enumerate() {
            let x = 0.5 + i as f64 * 2.0;
            chart
                .draw_series([Rectangle::new(
                    [(x, 0.0), (x + 1.0, s.median)],
                    COLOURS[1].filled(),
                )])
                .map_err(failed)?;
            chart
                .draw_series([PathElement::new(
                    vec![(x + 0.5, s.min), (x + 0.5, s.max)],
                    BLACK.stroke_width(2),
                )])
                .map_err(failed)?;
            chart
                .draw_series([Text::new(
                    format!("{:.2}", s.median),
                    (x + 0.15, s.max + top * 0.04),
                    (FONT, 13),
                )])
                .map_err(failed)?;
            chart
                .draw_series([Text::new(name.to_string(), (x, -top * 0.05), (FONT, 14))])
                .map_err(failed)?;
        }
        let width = measured.len() as f64 * 2.0;
        for (target, label) in [(0.85, "target vs the stand-in: 0.85"), (1.0, "direct")] {
            chart
                .draw_series([PathElement::new(
                    vec![(0.0, target), (width, target)],
                    COLOURS[2].stroke_width(1),
                )])
                .map_err(failed)?;
            chart
                .draw_series([Text::new(
                    label.to_string(),
                    (width - 1.9, target + top * 0.04),
                    (FONT, 12),
                )])
                .map_err(failed)?;
        }
        root.present().map_err(failed)
    })())
}

/// The proxy's RSS against the number of idle sessions, after a first wave
/// came and went and in a fresh process.
fn idle_rss(path: &Path, r: &Results) -> Option<Drawn> {
    let tiers: Vec<_> = r
        .idle
        .iter()
        .filter(|t| t.via == Some(Via::Ours) && t.established > 0)
        .collect();
    if tiers.is_empty() {
        return None;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let after: Vec<(f64, f64)> = std::iter::once((0.0, mib(tiers[0].rss_base_kib)))
        .chain(tiers.iter().map(|t| (t.established as f64, mib(t.rss_kib))))
        .collect();
    let fresh: Vec<(f64, f64)> = std::iter::once((0.0, mib(tiers[0].rss_base_kib)))
        .chain(
            tiers
                .iter()
                .filter_map(|t| t.rss_fresh_kib.map(|(k, n)| (n as f64, mib(k)))),
        )
        .collect();
    Some((|| {
        let right = after.iter().map(|p| p.0).fold(1.0f64, f64::max) * 1.05;
        let top = after
            .iter()
            .chain(&fresh)
            .map(|p| p.1)
            .fold(1.0f64, f64::max)
            * 1.2;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("xoauth2-proxy RSS against idle IMAP sessions", (FONT, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..right, 0f64..top)
            .map_err(failed)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("idle sessions (SELECT + IDLE)")
            .y_desc("RSS, MiB")
            .draw()
            .map_err(failed)?;
        for (points, colour, name) in [
            (&after, COLOURS[1], "after a first wave came and went"),
            (&fresh, COLOURS[2], "in a fresh process"),
        ] {
            chart
                .draw_series([PathElement::new(points.clone(), colour.stroke_width(2))])
                .map_err(failed)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
                .map_err(failed)?;
        }
        for t in &tiers {
            if let Some(k) = t.kib_per_session() {
                chart
                    .draw_series([Text::new(
                        format!("{k:.1} KiB per session"),
                        (t.established as f64 * 0.55, mib(t.rss_kib)),
                        (FONT, 13),
                    )])
                    .map_err(failed)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(failed)?;
        root.present().map_err(failed)
    })())
}
