//! The evaluation report as one self-contained HTML file: summary table, ROC curve, score
//! histogram of good vs defective images (plotters, SVG inline) and the worst misses with
//! their heat-map overlays (PNG inline).

use super::eval::{EvalReport, ScoredImage};
use crate::error::{CompileError, Result};
use base64::Engine as _;
use neo_runtime::{anomaly, preprocess, Model};
use plotters::prelude::*;
use std::fmt::Write as _;

fn plot_err<E: std::fmt::Display>(e: E) -> CompileError {
    CompileError::Options(format!("drawing the report: {e}"))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// ROC points (false positive rate, true positive rate) from scores, highest threshold first.
pub fn roc_points(scores: &[ScoredImage]) -> Vec<(f32, f32)> {
    let mut sorted: Vec<&ScoredImage> = scores.iter().collect();
    sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
    let pos = scores.iter().filter(|s| s.defective).count().max(1) as f32;
    let neg = scores.iter().filter(|s| !s.defective).count().max(1) as f32;
    let (mut tp, mut fp) = (0f32, 0f32);
    let mut pts = vec![(0.0, 0.0)];
    for s in sorted {
        if s.defective {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        pts.push((fp / neg, tp / pos));
    }
    pts
}

fn roc_svg(report: &EvalReport) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("ROC (image AUROC {:.4})", report.image_auroc),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0f32..1f32, 0f32..1.02f32)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("false NG rate (good images flagged)")
            .y_desc("true NG rate (defects caught)")
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.2)))
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(
                roc_points(&report.scores),
                RED.stroke_width(2),
            ))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn histogram_svg(report: &EvalReport) -> Result<String> {
    const BINS: usize = 30;
    let max = report
        .scores
        .iter()
        .map(|s| s.score)
        .filter(|s| s.is_finite())
        .fold(1.5f32, f32::max)
        * 1.05;
    let width = max / BINS as f32;
    let bin = |s: f32| ((s / width) as usize).min(BINS - 1);
    let mut good = [0u32; BINS];
    let mut bad = [0u32; BINS];
    for s in &report.scores {
        if s.score.is_finite() {
            if s.defective {
                bad[bin(s.score)] += 1;
            } else {
                good[bin(s.score)] += 1;
            }
        }
    }
    let top = good.iter().chain(&bad).copied().max().unwrap_or(1) + 1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Scores: good (green) vs defective (red); threshold = 1.0",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(40)
            .build_cartesian_2d(0f32..max, 0u32..top)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("normalized score")
            .y_desc("images")
            .draw()
            .map_err(plot_err)?;
        for (counts, color) in [(&good, GREEN.mix(0.5)), (&bad, RED.mix(0.5))] {
            chart
                .draw_series(
                    counts
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(i, c)| {
                            let x0 = i as f32 * width;
                            Rectangle::new([(x0, 0), (x0 + width, *c)], color.filled())
                        }),
                )
                .map_err(plot_err)?;
        }
        chart
            .draw_series(LineSeries::new(
                [(1.0, 0), (1.0, top)],
                BLACK.stroke_width(2),
            ))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The images the detector got most wrong: the highest-scored good ones and the
/// lowest-scored defective ones, `n` of each at most.
pub fn worst_misses(report: &EvalReport, n: usize) -> Vec<&ScoredImage> {
    let mut good: Vec<&ScoredImage> = report.scores.iter().filter(|s| !s.defective).collect();
    good.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut bad: Vec<&ScoredImage> = report.scores.iter().filter(|s| s.defective).collect();
    bad.sort_by(|a, b| a.score.total_cmp(&b.score));
    good.into_iter()
        .take(n)
        .chain(bad.into_iter().take(n))
        .collect()
}

fn overlay_png(model: &Model, file: &str) -> Result<String> {
    let img = preprocess::load(std::path::Path::new(file))?;
    let (preds, _) = model.predict(&img, 1)?;
    let Some(result) = preds.iter().find_map(|p| p.anomaly.as_ref()) else {
        return Err(CompileError::Options(
            "the detector gave no anomaly map".into(),
        ));
    };
    let window = model.input_window(img.width(), img.height());
    let mut png = Vec::new();
    anomaly::overlay(&img, result, window)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(plot_err)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Renders the whole report as HTML; `model` re-runs the worst misses for their overlays.
pub fn html(report: &EvalReport, model: &Model) -> Result<String> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>neo eval: {}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{background:#f4f4f4}}\
         .figs{{display:flex;gap:1em;flex-wrap:wrap}}.miss{{display:inline-block;margin:0.5em;text-align:center}}\
         .miss img{{max-width:240px;border:1px solid #888}}</style></head><body>",
        escape(&report.detector)
    );
    let _ = write!(
        h,
        "<h1>Detector evaluation</h1><p>Detector <code>{}</code> on <code>{}</code>: {} images, {} defective.</p>",
        escape(&report.detector),
        escape(&report.dataset),
        report.images,
        report.defective
    );
    let c = &report.confusion;
    let _ = write!(
        h,
        "<table><tr><th>image AUROC</th><th>pixel AUROC</th><th>precision</th><th>recall</th><th>F1</th>\
         <th>latency p50</th><th>latency p99</th></tr><tr><td>{:.4}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td>\
         <td>{:.3}</td><td>{:.1} ms</td><td>{:.1} ms</td></tr></table>\
         <h2>At the stored threshold</h2><table><tr><th></th><th>flagged NG</th><th>passed OK</th></tr>\
         <tr><th>defective</th><td>{}</td><td>{}</td></tr><tr><th>good</th><td>{}</td><td>{}</td></tr></table>",
        report.image_auroc,
        report.pixel_auroc.map_or("n/a".to_string(), |a| format!("{a:.4}")),
        report.precision,
        report.recall,
        report.f1,
        report.latency_ms_p50,
        report.latency_ms_p99,
        c.true_ng,
        c.false_ok,
        c.false_ng,
        c.true_ok
    );
    h.push_str("<h2>Per type</h2><table><tr><th>type</th><th>images</th><th>flagged NG</th></tr>");
    for (kind, t) in &report.per_type {
        let _ = write!(
            h,
            "<tr><th>{}</th><td>{}</td><td>{}</td></tr>",
            escape(kind),
            t.images,
            t.flagged_ng
        );
    }
    h.push_str("</table><div class=\"figs\">");
    h.push_str(&roc_svg(report)?);
    h.push_str(&histogram_svg(report)?);
    h.push_str("</div><h2>Worst misses</h2>");
    for s in worst_misses(report, 4) {
        let png = overlay_png(model, &s.file)?;
        let _ = write!(
            h,
            "<div class=\"miss\"><img src=\"data:image/png;base64,{png}\"><br>{} ({})<br>score {:.3}</div>",
            escape(s.file.rsplit('/').next().unwrap_or(&s.file)),
            escape(&s.kind),
            s.score
        );
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(score: f32, defective: bool) -> ScoredImage {
        ScoredImage {
            file: "x".into(),
            kind: "k".into(),
            defective,
            score,
        }
    }

    #[test]
    fn roc_of_a_perfect_separation_goes_through_the_top_left() {
        let pts = roc_points(&[
            img(0.1, false),
            img(0.2, false),
            img(2.0, true),
            img(3.0, true),
        ]);
        assert_eq!(
            pts,
            [(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]
        );
    }
}
