//! Results of the harness: one row per measurement, written as `results.csv`, markdown tables
//! for `report.md`, and SVG plots (lines, and stacked horizontal bars).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One measured configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Which experiment: `compare`, `depth`, `workers`, `width`, `noise`, `memory`, `speedup`.
    pub sweep: String,
    /// `sid` or `bp`.
    pub method: String,
    /// Name of the swept parameter (`L`, `K`, `hidden`, `noise`).
    pub param: String,
    /// Its value.
    pub value: f64,
    /// Median milliseconds per training step.
    pub ms_per_step: Option<f64>,
    /// Training samples per second.
    pub samples_per_s: Option<f64>,
    /// Peak memory, bytes (per-device maximum).
    pub peak_bytes: Option<u64>,
    /// Final-epoch test accuracy in [0, 1].
    pub test_acc: Option<f64>,
    /// Test accuracy per epoch.
    pub acc_by_epoch: Vec<f64>,
    /// Free-form note (devices, what the memory figure is).
    pub note: String,
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_default()
}

/// Writes every row to a CSV file.
pub fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    w.write_record([
        "sweep",
        "method",
        "param",
        "value",
        "ms_per_step",
        "samples_per_s",
        "peak_bytes",
        "test_acc",
        "note",
    ])?;
    for r in rows {
        w.write_record([
            r.sweep.clone(),
            r.method.clone(),
            r.param.clone(),
            r.value.to_string(),
            opt(&r.ms_per_step.map(|v| format!("{v:.3}"))),
            opt(&r.samples_per_s.map(|v| format!("{v:.1}"))),
            opt(&r.peak_bytes),
            opt(&r.test_acc.map(|v| format!("{v:.4}"))),
            r.note.clone(),
        ])?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// A markdown table of SID and BP side by side for each value of the swept parameter, with
/// the SID/BP ratios.
pub fn side_by_side(rows: &[Row], sweep: &str) -> String {
    let mut values: Vec<f64> = rows
        .iter()
        .filter(|r| r.sweep == sweep)
        .map(|r| r.value)
        .collect();
    values.sort_by(|a, b| a.total_cmp(b));
    values.dedup();
    let param = rows
        .iter()
        .find(|r| r.sweep == sweep)
        .map(|r| r.param.clone())
        .unwrap_or_default();
    let mut s = format!(
        "| {param} | SID ms/step | BP ms/step | SID/BP time | SID samples/s | BP samples/s | SID peak MiB | BP peak MiB | SID/BP memory | SID acc | BP acc |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.1}", b as f64 / 1048576.0))
            .unwrap_or_else(|| "–".into())
    };
    let num =
        |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "–".into());
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.2}%", 100.0 * x))
            .unwrap_or_else(|| "–".into())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    };
    for v in values {
        let get = |m: &str| {
            rows.iter()
                .find(|r| r.sweep == sweep && r.method == m && r.value == v)
        };
        let (sid, bp) = (get("sid"), get("bp"));
        let f = |r: Option<&Row>, g: fn(&Row) -> Option<f64>| r.and_then(g);
        let _ = writeln!(
            s,
            "| {v} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(f(sid, |r| r.ms_per_step), 2),
            num(f(bp, |r| r.ms_per_step), 2),
            ratio(f(sid, |r| r.ms_per_step), f(bp, |r| r.ms_per_step)),
            num(f(sid, |r| r.samples_per_s), 0),
            num(f(bp, |r| r.samples_per_s), 0),
            mib(sid.and_then(|r| r.peak_bytes)),
            mib(bp.and_then(|r| r.peak_bytes)),
            ratio(
                sid.and_then(|r| r.peak_bytes.map(|b| b as f64)),
                bp.and_then(|r| r.peak_bytes.map(|b| b as f64))
            ),
            pct(f(sid, |r| r.test_acc)),
            pct(f(bp, |r| r.test_acc)),
        );
    }
    s
}

/// A line plot with one series per (name, points), saved as SVG.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = |a: f64, b: f64| {
        if (b - a).abs() < 1e-12 {
            (a - 1.0, b + 1.0)
        } else {
            (a - 0.05 * (b - a), b + 0.05 * (b - a))
        }
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The series' names and marks in a framed box at `at`.
fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Horizontal bars, one per `(label, parts)` from the top, each stacked from its parts (named
/// by `parts`, one colour each), saved as SVG.
pub fn bar_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    parts: &[&str],
    bars: &[(String, Vec<f64>)],
) -> Result<()> {
    if bars.is_empty() {
        return Ok(());
    }
    let most = bars
        .iter()
        .map(|(_, v)| v.iter().sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-9);
    let n = bars.len();
    let label_width = bars.iter().map(|(l, _)| l.len()).max().unwrap_or(0) as u32;
    let root = SVGBackend::new(path, (880, 90 + 28 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size((7 * label_width).clamp(80, 420))
        // Room on the right for the legend, clear of every bar.
        .build_cartesian_2d(
            0.0..most * if parts.len() > 1 { 1.75 } else { 1.08 },
            (0..n as i32).into_segmented(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Bar i is drawn in segment n−1−i, so the first is at the top.
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(y) | SegmentValue::Exact(y) => bars
            .get(n.wrapping_sub(*y as usize + 1))
            .map_or(String::new(), |b| b.0.clone()),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n + 1)
        .y_label_formatter(&label)
        .x_desc(x_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (p, name) in parts.iter().enumerate() {
        let color = Palette99::pick(p).to_rgba();
        let rects = bars.iter().enumerate().filter_map(|(i, (_, v))| {
            let from: f64 = v.iter().take(p).sum();
            let y = (n - i - 1) as i32;
            v.get(p).map(|w| {
                let mut r = Rectangle::new(
                    [
                        (from, SegmentValue::Exact(y)),
                        (from + w, SegmentValue::Exact(y + 1)),
                    ],
                    color.filled(),
                );
                r.set_margin(4, 4, 0, 0);
                r
            })
        });
        chart
            .draw_series(rects)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if parts.len() > 1 {
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Points (value, f(row)) of one method in one sweep, sorted by value.
pub fn series(
    rows: &[Row],
    sweep: &str,
    method: &str,
    f: impl Fn(&Row) -> Option<f64>,
) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.sweep == sweep && r.method == method)
        .filter_map(|r| f(r).map(|y| (r.value, y)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, value: f64, ms: f64) -> Row {
        Row {
            sweep: "depth".into(),
            method: method.into(),
            param: "L".into(),
            value,
            ms_per_step: Some(ms),
            peak_bytes: Some(1 << 20),
            test_acc: Some(0.5),
            ..Default::default()
        }
    }

    #[test]
    fn table_csv_and_plot() {
        let rows = vec![
            row("sid", 2.0, 10.0),
            row("bp", 2.0, 5.0),
            row("sid", 4.0, 20.0),
            row("bp", 4.0, 8.0),
        ];
        let t = side_by_side(&rows, "depth");
        assert!(t.contains("| 2 | 10.00 | 5.00 | 2.00 |"), "{t}");
        assert!(t.contains("| 4 | 20.00 | 8.00 | 2.50 |"), "{t}");
        let dir = tempfile::tempdir().unwrap();
        write_csv(&dir.path().join("r.csv"), &rows).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("r.csv")).unwrap();
        assert_eq!(csv.lines().count(), 5);
        // A note with a comma and quotes survives a round trip as one field.
        let mut noted = rows[0].clone();
        noted.note = "devices 0,1; \"peak\" = cuda-allocator".into();
        write_csv(&dir.path().join("n.csv"), &[noted.clone()]).unwrap();
        let mut r = csv::Reader::from_path(dir.path().join("n.csv")).unwrap();
        let rec = r.records().next().unwrap().unwrap();
        assert_eq!(rec.len(), 9);
        assert_eq!(&rec[8], noted.note);
        let svg = dir.path().join("p.svg");
        let s = vec![(
            "sid".to_string(),
            series(&rows, "depth", "sid", |r| r.ms_per_step),
        )];
        line_plot(&svg, "ms/step vs L", "L", "ms", &s).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("ms/step vs L"));
        let bars = dir.path().join("b.svg");
        let rows = vec![
            ("stage 1".to_string(), vec![2.0, 30.0]),
            ("stage 2".to_string(), vec![8.0, 12.0]),
        ];
        bar_plot(&bars, "peak memory", "MB", &["state", "working"], &rows).unwrap();
        let text = std::fs::read_to_string(&bars).unwrap();
        assert!(text.contains("stage 1") && text.contains("stage 2") && text.contains("working"));
        assert!(
            text.matches("<rect").count() >= 4 + 2,
            "four bars and two legend marks"
        );
    }
}
