//! PNG plots of a run's `metrics.jsonl`: training loss on the left, the
//! evaluation curves on the right, both against the optimiser step.
//!
//! Text uses DejaVu Sans embedded from the `dejavu` crate: plotters'
//! `ab_glyph` backend has no access to system fonts, which keeps the plot
//! identical on every machine (and working on a bare CI box).
//!
//! A PPO run (its `"train"` lines hold `rlhf_reward`) gets a grid of small
//! panels instead, one per metric of its rollout batches.
//!
//! Which lines are what: a line with `"split"` (or any `eval_*` key) is an
//! evaluation; other lines with `"loss"` are training steps. Every numeric
//! field of an evaluation is drawn except bookkeeping (`step`, `epoch`, `lr`,
//! timings, counts). Metrics that are minimised (losses, errors) share the
//! left axis; maximised ones (accuracy, F1, Pearson) get the right axis, so
//! a loss of 2.3 does not flatten an accuracy of 0.9.

use crate::metrics::{direction, Direction};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 450;
const FONT: &str = "sans-serif";

/// Tableau 10: distinguishable and colour-blind friendlier than pure RGB.
const COLORS: [RGBColor; 10] = [
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

/// Register the embedded font once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::msg(
            "plot: cannot load the embedded DejaVu Sans font",
        ))
    }
}

/// Keys of an evaluation line that are not curves worth drawing.
fn is_bookkeeping(key: &str) -> bool {
    const KEYS: [&str; 11] = [
        "step",
        "epoch",
        "episodes",
        "lr",
        "learning_rate",
        "grad_norm",
        "examples",
        "num_examples",
        "samples",
        "tokens",
        "n",
    ];
    KEYS.contains(&key)
        || key.contains("time")
        || key.ends_with("_s")
        || key.ends_with("_ms")
        || key.ends_with("seconds")
        || key.ends_with("per_second")
}

/// The curves found in a run's records.
#[derive(Debug, Default)]
struct Curves {
    /// (step, loss) of training lines, in file order.
    train: Vec<(f64, f64)>,
    /// Series name -> (step, value), for evaluation lines.
    eval: BTreeMap<String, Vec<(f64, f64)>>,
    max_step: f64,
}

fn collect(records: &[Value]) -> Curves {
    let mut c = Curves::default();
    let num = |v: Option<&Value>| v.and_then(Value::as_f64).filter(|x| x.is_finite());
    // Name series "validation accuracy" only when several splits are evaluated.
    let splits: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r.get("split").and_then(Value::as_str))
        .collect();
    for r in records {
        let Some(obj) = r.as_object() else { continue };
        let Some(step) = num(obj.get("step")) else {
            continue;
        };
        let split = obj.get("split").and_then(Value::as_str);
        let is_eval = split.is_some() || obj.keys().any(|k| k.starts_with("eval_"));
        if is_eval {
            for (key, v) in obj {
                if key == "split" || is_bookkeeping(key) {
                    continue;
                }
                let Some(y) = num(Some(v)) else { continue };
                let name = match split {
                    Some(s) if splits.len() > 1 => format!("{s} {key}"),
                    _ => key.clone(),
                };
                c.eval.entry(name).or_default().push((step, y));
                c.max_step = c.max_step.max(step);
            }
        } else if let Some(loss) = num(obj.get("loss")) {
            c.train.push((step, loss));
            c.max_step = c.max_step.max(step);
        }
    }
    c
}

/// Trailing moving average over `window` points (shorter at the start).
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

/// `lo..hi` around the values with a 5% margin; never empty.
fn y_range<'a>(values: impl Iterator<Item = &'a f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
        (l.min(v), h.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad)..(hi + pad)
}

/// Draw the loss and evaluation curves of `records` (the lines of a run's
/// `metrics.jsonl`) into a 1000x450 PNG at `out_png`, written atomically.
/// The file is PNG whatever its extension.
pub fn plot_run(records: &[Value], out_png: &Path) -> Result<()> {
    ensure_font()?;
    if let Some(panels) = panels_of(records) {
        return write_png(out_png, |tmp| draw_grid(&panels, tmp, out_png));
    }
    let curves = collect(records);
    if curves.train.is_empty() && curves.eval.is_empty() {
        return Err(Error::file(
            out_png,
            "nothing to plot: no training `loss` or evaluation lines with a `step`",
        ));
    }
    write_png(out_png, |tmp| draw(&curves, tmp, out_png))
}

/// Draw with `draw` into a temporary `.png` beside `out_png`, then rename
/// it into place.
fn write_png(out_png: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = out_png.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    // The bitmap encoder picks the format from the extension, so the
    // temporary name must end in `.png` (fsutil's `.tmp.<pid>` would not).
    let stem = out_png
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plot");
    let tmp: PathBuf = out_png.with_file_name(format!(".{stem}.tmp.{}.png", std::process::id()));
    let drawn = draw(&tmp);
    let res = drawn.and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, out_png))
            .map_err(|e| Error::io(out_png, e))
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// The metrics of a PPO run, one small panel each: its `"train"` lines
/// (one per rollout batch) and the validation reward.
const PPO_PANELS: [(&str, &str); 12] = [
    ("train", "score"),
    ("validation", "reward"),
    ("train", "kl"),
    ("train", "kl_k3"),
    ("train", "entropy"),
    ("train", "approx_kl"),
    ("train", "clipfrac"),
    ("train", "value_clipfrac"),
    ("train", "policy_loss"),
    ("train", "value_loss"),
    ("train", "response_length"),
    ("train", "eos_share"),
];

/// A run whose `"train"` lines are PPO's (they hold `rlhf_reward`): the
/// series of its panels, else None.
#[allow(clippy::type_complexity)]
fn panels_of(records: &[Value]) -> Option<Vec<(String, Vec<(f64, f64)>)>> {
    let split = |r: &Value| r.get("split").and_then(Value::as_str).map(str::to_string);
    if !records
        .iter()
        .any(|r| split(r).as_deref() == Some("train") && r.get("rlhf_reward").is_some())
    {
        return None;
    }
    Some(
        PPO_PANELS
            .iter()
            .map(|(sp, key)| {
                let pts = records
                    .iter()
                    .filter(|r| split(r).as_deref() == Some(*sp))
                    .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*key)?.as_f64()?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                let name = if *sp == "train" {
                    key.to_string()
                } else {
                    format!("{sp} {key}")
                };
                (name, pts)
            })
            .collect(),
    )
}

/// A grid of small panels, one series each, against the optimizer step.
fn draw_grid(panels: &[(String, Vec<(f64, f64)>)], tmp: &Path, out_png: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::file(out_png, format!("plot: {e}"));
    let root = BitMapBackend::new(tmp, (1200, 780)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let max_x = panels
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1.0f64, f64::max);
    for (i, (area, (name, pts))) in root.split_evenly((3, 4)).iter().zip(panels).enumerate() {
        draw_panel(area, name, pts, 0.0..max_x, COLORS[i % COLORS.len()]).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn draw_panel(
    area: &Area,
    name: &str,
    pts: &[(f64, f64)],
    x: Steps,
    color: RGBColor,
) -> DrawResult {
    if pts.is_empty() {
        return empty_panel(area, name, "not logged");
    }
    let mut chart = ChartBuilder::on(area)
        .caption(name, (FONT, 15).into_font().style(FontStyle::Bold))
        .margin(6)
        .x_label_area_size(22)
        .y_label_area_size(48)
        .build_cartesian_2d(x.clone(), y_range(pts.iter().map(|p| &p.1)))?;
    chart
        .configure_mesh()
        .x_label_formatter(&step_label)
        .x_labels(x_ticks(&x).min(5))
        .y_labels(5)
        .label_style((FONT, 11))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
    Ok(())
}

fn draw(curves: &Curves, tmp: &Path, out_png: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::file(out_png, format!("plot: {e}"));
    let root = BitMapBackend::new(tmp, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let x_range = 0.0..curves.max_step.max(1.0);
    draw_train(&left, curves, x_range.clone()).map_err(|e| err(&e))?;
    draw_eval(&right, curves, x_range).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Legend entries drawn in a strip under a chart, wrapped into rows, so a
/// legend never covers a curve (inside the plot, some curve always crosses it).
struct Legend {
    items: Vec<(String, RGBColor)>,
}

impl Legend {
    const ROW: i32 = 20;
    const LEFT: i32 = 72;

    /// Rows of (x offset, item index) for a strip `width` pixels wide.
    fn layout(&self, area: &DrawingArea<BitMapBackend, Shift>) -> Vec<Vec<(i32, usize)>> {
        let width = area.dim_in_pixel().0 as i32 - 12;
        let font = TextStyle::from((FONT, 13).into_font());
        let mut rows: Vec<Vec<(i32, usize)>> = vec![vec![]];
        let mut x = Self::LEFT;
        for (i, (label, _)) in self.items.iter().enumerate() {
            let w = 26
                + area
                    .estimate_text_size(label, &font)
                    .map(|s| s.0 as i32)
                    .unwrap_or(8 * label.len() as i32);
            if x + w > width && !rows.last().unwrap().is_empty() {
                rows.push(vec![]);
                x = Self::LEFT;
            }
            rows.last_mut().unwrap().push((x, i));
            x += w + 18;
        }
        rows
    }

    fn height(&self, area: &DrawingArea<BitMapBackend, Shift>) -> u32 {
        (self.layout(area).len() as i32 * Self::ROW + 6) as u32
    }

    fn draw(&self, area: &DrawingArea<BitMapBackend, Shift>) -> DrawResult {
        for (r, row) in self.layout(area).iter().enumerate() {
            let y = r as i32 * Self::ROW + Self::ROW / 2;
            for &(x, i) in row {
                let (label, color) = &self.items[i];
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    color.stroke_width(3),
                ))?;
                area.draw(&Text::new(
                    label.clone(),
                    (x + 26, y),
                    TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
            }
        }
        Ok(())
    }

    /// Split `area` into (chart, legend strip).
    fn split<'a>(
        &self,
        area: &DrawingArea<BitMapBackend<'a>, Shift>,
    ) -> (
        DrawingArea<BitMapBackend<'a>, Shift>,
        DrawingArea<BitMapBackend<'a>, Shift>,
    ) {
        let h = area.dim_in_pixel().1;
        area.split_vertically(h - self.height(area))
    }
}

type DrawResult = std::result::Result<
    (),
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

/// The grid and axis labels of a panel (steps along x), one look for both
/// panels (a macro: the two charts' coordinate types differ).
macro_rules! draw_mesh {
    ($chart:expr, $y_desc:expr, $ticks:expr) => {
        $chart
            .configure_mesh()
            .x_desc("step")
            .y_desc($y_desc)
            .x_label_formatter(&step_label)
            .x_labels($ticks)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()?
    };
}

/// One panel of the figure.
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
/// The x axis: optimizer steps.
type Steps = std::ops::Range<f64>;

fn empty_panel(area: &Area, caption: &str, note: &str) -> DrawResult {
    // Same top margin as the charts' captions, so the two titles line up.
    let area = area
        .margin(12, 0, 0, 0)
        .titled(caption, (FONT, 20).into_font().style(FontStyle::Bold))?;
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FONT, 15).into_font())
        .color(&RGBColor(110, 110, 110))
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(
        note.to_string(),
        (w as i32 / 2, h as i32 / 2),
        style,
    ))
}

/// Steps are integers: no "50.0" ticks.
fn step_label(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Number of x ticks: at most 10, and no more than there are whole steps, so
/// a 2-step run gets ticks 0, 1, 2 rather than 0, 0.2, 0.4, ...
fn x_ticks(x_range: &std::ops::Range<f64>) -> usize {
    (x_range.end as usize + 1).clamp(2, 10)
}

fn draw_train(area: &Area, curves: &Curves, x_range: Steps) -> DrawResult {
    if curves.train.is_empty() {
        return empty_panel(area, "Training loss", "no training loss logged");
    }
    // A window of ~1/20 of the run smooths batch noise without hiding trends.
    let window = (curves.train.len() / 20).clamp(1, 200);
    // Under a moving average the raw curve is faded: the noise stays in the background.
    let raw_color = if window > 1 {
        RGBColor(158, 194, 222)
    } else {
        COLORS[0]
    };
    let mut legend = Legend {
        items: vec![("loss".to_string(), raw_color)],
    };
    if window > 1 {
        legend
            .items
            .push((format!("moving average ({window} points)"), COLORS[0]));
    }
    let (chart_area, legend_area) = legend.split(area);
    let ticks = x_ticks(&x_range);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "Training loss",
            (FONT, 20).into_font().style(FontStyle::Bold),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range(curves.train.iter().map(|p| &p.1)))?;
    draw_mesh!(chart, "loss", ticks);
    chart.draw_series(LineSeries::new(
        curves.train.iter().copied(),
        raw_color.stroke_width(1),
    ))?;
    if window > 1 {
        let smooth = moving_average(&curves.train, window);
        chart.draw_series(LineSeries::new(smooth, COLORS[0].stroke_width(2)))?;
    } else if curves.train.len() <= 3 {
        // A line needs two points: mark them so a very short run still shows.
        chart.draw_series(
            curves
                .train
                .iter()
                .map(|&p| Circle::new(p, 3, COLORS[0].filled())),
        )?;
    }
    legend.draw(&legend_area)
}

fn draw_eval(area: &Area, curves: &Curves, x_range: Steps) -> DrawResult {
    if curves.eval.is_empty() {
        return empty_panel(area, "Evaluation", "no evaluation logged");
    }
    // Minimised metrics on the left axis, maximised on the right; with only
    // one kind, it takes the left axis alone.
    let base = |name: &str| name.rsplit(' ').next().unwrap_or(name).to_string();
    let (mut left, mut right): (Vec<_>, Vec<_>) = curves
        .eval
        .iter()
        .partition(|(name, _)| direction(&base(name)) == Direction::Minimize);
    let mut left_desc = "loss";
    if left.is_empty() {
        std::mem::swap(&mut left, &mut right);
        left_desc = "metric";
    }
    let mut colors = COLORS.iter().cycle().skip(1).copied();
    let left: Vec<_> = left
        .into_iter()
        .map(|(n, p)| (n.clone(), p, colors.next().unwrap()))
        .collect();
    let right: Vec<_> = right
        .into_iter()
        .map(|(n, p)| (n.clone(), p, colors.next().unwrap()))
        .collect();
    let legend = Legend {
        items: left
            .iter()
            .map(|(n, _, c)| (n.clone(), *c))
            .chain(
                right
                    .iter()
                    .map(|(n, _, c)| (format!("{n} (right axis)"), *c)),
            )
            .collect(),
    };
    let (chart_area, legend_area) = legend.split(area);
    let ticks = x_ticks(&x_range);

    let left_y = y_range(left.iter().flat_map(|(_, pts, _)| pts.iter().map(|p| &p.1)));
    let right_y = y_range(
        right
            .iter()
            .flat_map(|(_, pts, _)| pts.iter().map(|p| &p.1)),
    );
    let mut chart = ChartBuilder::on(&chart_area)
        .caption("Evaluation", (FONT, 20).into_font().style(FontStyle::Bold))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(if right.is_empty() { 0 } else { 60 })
        .build_cartesian_2d(x_range.clone(), left_y)?
        .set_secondary_coord(x_range, right_y);
    draw_mesh!(chart, left_desc, ticks);
    if !right.is_empty() {
        chart
            .configure_secondary_axes()
            .y_desc("metric")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
    }
    // Evaluations are sparse: mark each one so a single point still shows.
    for (_, pts, color) in &left {
        chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    for (_, pts, color) in &right {
        chart.draw_secondary_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        chart.draw_secondary_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    legend.draw(&legend_area)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A synthetic run: noisy decaying loss every step, evaluation every 50.
    fn synthetic_run() -> Vec<Value> {
        let mut records = Vec::new();
        let mut noise = 0x2545_F491_4F6C_DD1Du64;
        for step in 1..=300u64 {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            let jitter = (noise % 1000) as f64 / 1000.0 - 0.5;
            let loss = 0.3 + 0.4 * (-(step as f64) / 80.0).exp() + 0.12 * jitter;
            records.push(json!({"step": step, "epoch": step / 100, "loss": loss, "lr": 2e-5, "elapsed_s": 0.1}));
            if step % 50 == 0 {
                let t = step as f64 / 300.0;
                records.push(json!({
                    "step": step, "split": "validation",
                    "eval_loss": 0.65 - 0.25 * t, "accuracy": 0.6 + 0.3 * t, "macro_f1": 0.55 + 0.32 * t,
                    "runtime_s": 1.5, "examples": 500
                }));
            }
        }
        records
    }

    fn png_size(path: &Path) -> (u32, u32) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info.width, info.height)
    }

    #[test]
    fn collects_train_and_eval_series() {
        let c = collect(&synthetic_run());
        assert_eq!(c.train.len(), 300);
        assert_eq!(
            c.eval.keys().collect::<Vec<_>>(),
            ["accuracy", "eval_loss", "macro_f1"]
        );
        assert_eq!(c.eval["accuracy"].len(), 6);
        assert_eq!(c.max_step, 300.0);
        assert_eq!(
            moving_average(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], 2),
            vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]
        );
    }

    #[test]
    fn plots_a_synthetic_run() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run").join("metrics.png");
        plot_run(&synthetic_run(), &out).unwrap();
        assert_eq!(png_size(&out), (WIDTH, HEIGHT));
        // Only the target is left behind, no temporary file.
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
        // `AFINAR_KEEP_PLOT=/tmp/p.png cargo test ... plot::` keeps the image to look at.
        if let Ok(keep) = std::env::var("AFINAR_KEEP_PLOT") {
            std::fs::copy(&out, keep).unwrap();
        }
    }

    #[test]
    fn a_ppo_run_gets_one_panel_per_metric() {
        let mut records = Vec::new();
        for b in 1..=12u64 {
            let step = 4 * b;
            records.push(json!({"step": step, "loss": 0.1, "lr": 1e-4}));
            records.push(json!({
                "step": step, "split": "train", "score": 0.1 * b as f64, "rlhf_reward": 0.1,
                "kl": 0.05 * b as f64, "kl_k3": 0.04, "entropy": 1.5, "approx_kl": 0.01, "clipfrac": 0.1,
                "value_clipfrac": 0.2, "policy_loss": -0.01, "value_loss": 0.3, "response_length": 20.0,
                "eos_share": 0.9, "episodes": 32 * b, "rollout_s": 30.0
            }));
            if b % 4 == 0 {
                records.push(json!({"step": step, "split": "validation", "reward": 0.2}));
            }
        }
        let panels = panels_of(&records).unwrap();
        assert_eq!(panels.len(), 12);
        assert_eq!(panels[0].0, "score");
        assert_eq!(panels[0].1.len(), 12);
        assert_eq!(
            panels[1],
            (
                "validation reward".into(),
                vec![(16.0, 0.2), (32.0, 0.2), (48.0, 0.2)]
            )
        );
        assert!(
            panels_of(&synthetic_run()).is_none(),
            "other runs keep the two-panel figure"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("metrics.png");
        plot_run(&records, &out).unwrap();
        assert_eq!(png_size(&out), (1200, 780));
        if let Ok(keep) = std::env::var("AFINAR_KEEP_PPO_PLOT") {
            std::fs::copy(&out, keep).unwrap();
        }
    }

    #[test]
    fn plots_partial_runs_and_rejects_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let only_train = dir.path().join("train.png");
        plot_run(
            &[
                json!({"step": 1, "loss": 2.0}),
                json!({"step": 2, "loss": 1.5}),
            ],
            &only_train,
        )
        .unwrap();
        assert_eq!(png_size(&only_train), (WIDTH, HEIGHT));
        let only_eval = dir.path().join("eval.png");
        plot_run(
            &[json!({"step": 10, "split": "validation", "accuracy": 0.5})],
            &only_eval,
        )
        .unwrap();
        assert_eq!(png_size(&only_eval), (WIDTH, HEIGHT));

        // Two evaluated splits and many metrics: names carry the split, the legend wraps.
        let mut run = synthetic_run();
        run.push(json!({"step": 300, "split": "test", "eval_loss": 0.45, "accuracy": 0.88, "macro_f1": 0.86, "pearson": 0.7, "eval_mse": 0.3}));
        let c = collect(&run);
        assert!(c.eval.contains_key("validation accuracy") && c.eval.contains_key("test pearson"));
        let many = dir.path().join("many.png");
        plot_run(&run, &many).unwrap();
        assert_eq!(png_size(&many), (WIDTH, HEIGHT));

        let err = plot_run(&[json!({"note": "hi"})], &dir.path().join("x.png")).unwrap_err();
        assert!(err.to_string().contains("nothing to plot"), "{err}");
    }
}
