//! ONNX import with errors a user can act on: not ONNX, truncated, unsupported operators,
//! dynamic shapes.

use crate::error::{tract, CompileError, Result};
use std::path::Path;
use tract_onnx::pb::{GraphProto, ModelProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// A parsed ONNX model and the bytes it came from.
pub struct Imported {
    pub proto: ModelProto,
    pub model: InferenceModel,
    pub bytes: Vec<u8>,
}

/// Reads, decodes and checks an ONNX file; every operator must be one tract implements.
pub fn import(path: &Path) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(|source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let proto = onnx_framework()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|e| CompileError::NotOnnx {
            path: path.display().to_string(),
            reason: format!(
                "protobuf decoding failed ({e}); is the file truncated or of another format?"
            ),
        })?;
    from_proto(proto, bytes, path.parent(), &path.display().to_string())
}

/// Checks and parses a decoded (possibly edited) ONNX model. `bytes` are the source file's,
/// for its hash; `dir` is where external tensor data would be; `origin` names it in errors.
pub fn from_proto(
    proto: ModelProto,
    bytes: Vec<u8>,
    dir: Option<&Path>,
    origin: &str,
) -> Result<Imported> {
    let not_onnx = |reason: String| CompileError::NotOnnx {
        path: origin.to_string(),
        reason,
    };
    let onnx = onnx_framework();
    let graph = match proto.graph.as_ref() {
        Some(g) if !g.node.is_empty() && proto.ir_version > 0 => g,
        _ => return Err(not_onnx("it holds no ONNX graph".into())),
    };
    check_operators(&onnx, graph)?;
    let parsed = onnx
        .parse(&proto, dir.and_then(|p| p.to_str()))
        .map_err(|e| {
            not_onnx(format!(
                "{e:#} (is the file truncated, or missing its external data?)"
            ))
        })?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(not_onnx(format!(
            "tensors {:?} are used but never defined (is the file truncated?)",
            parsed.unresolved_inputs
        )));
    }
    Ok(Imported {
        proto,
        model: parsed.model,
        bytes,
    })
}

/// tract's ONNX importer as neoc configures it.
pub(crate) fn onnx_framework() -> tract_onnx::Onnx {
    // Shapes are inferred by tract from the input facts neoc sets; the shapes an exporter wrote
    // for intermediate tensors and outputs would pin symbols (a batch `N`) that neoc fixes.
    tract_onnx::onnx()
        .with_ignore_value_info(true)
        .with_ignore_output_shapes(true)
}

fn check_operators(onnx: &tract_onnx::Onnx, graph: &GraphProto) -> Result<()> {
    let missing: Vec<(&str, &str)> = graph
        .node
        .iter()
        .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
        .map(|n| {
            let name = if n.name.is_empty() {
                n.output.first().map(String::as_str).unwrap_or("?")
            } else {
                n.name.as_str()
            };
            (n.op_type.as_str(), name)
        })
        .collect();
    match missing.as_slice() {
        [] => Ok(()),
        [(op, node), rest @ ..] => Err(CompileError::UnsupportedOp {
            op: op.to_string(),
            node: node.to_string(),
            more: if rest.is_empty() {
                String::new()
            } else {
                format!(
                    " (and {} more: {})",
                    rest.len(),
                    rest.iter()
                        .map(|(o, n)| format!("{o} at '{n}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            tract: neo_runtime::TRACT_VERSION.to_string(),
        }),
    }
}

/// Whether a graph output is produced by a Softmax, possibly through shape-only operators.
pub fn output_is_softmax(graph: &GraphProto, output: &str) -> bool {
    let mut tensor = output.to_string();
    for _ in 0..8 {
        let Some(node) = graph.node.iter().find(|n| n.output.contains(&tensor)) else {
            return false;
        };
        match node.op_type.as_str() {
            "Softmax" => return true,
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" => {
                let Some(first) = node.input.first() else {
                    return false;
                };
                tensor = first.clone();
            }
            _ => return false,
        }
    }
    false
}

/// The input's dims as written in the model: `Some(n)` where fixed, `None` where symbolic.
pub fn input_dims(model: &InferenceModel, ix: usize) -> Result<Vec<Option<usize>>> {
    let fact = model
        .input_fact(ix)
        .map_err(tract("read the input shape"))?;
    Ok(fact
        .shape
        .dims()
        .map(|d| {
            d.concretize()
                .and_then(|d| d.to_i64().ok().and_then(|v| usize::try_from(v).ok()))
        })
        .collect())
}

/// Formats dims as `[N,3,224,224]` (`?` for symbolic).
pub fn format_dims(dims: &[Option<usize>], symbol: &str) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or(symbol.to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", parts.join(","))
}
