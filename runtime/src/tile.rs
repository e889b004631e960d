//! A tile's tract model: the group's stages copied from the imported model, reading
//! strips, with tile-local pads (docs/architecture.md, "Running a tile with tract").

use anyhow::{Context, Result, bail, ensure};
use legion_ir::{Ir, Rows, Stage, StageKind, TensorRef};
use legion_plan::TileSpec;
use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, MaxPool, PaddingSpec, PoolSpec, SumPool};
use tract_onnx::tract_core::ops::downsample::Downsample;

/// A runnable tile: feed the strips of [`TileSpec::inputs`], get those of [`TileSpec::outputs`].
pub struct TileModel {
    plan: std::sync::Arc<TypedSimplePlan>,
    spec: TileSpec,
    /// Bytes of the constants (weights) of its model.
    weight_bytes: u64,
}

impl TileModel {
    /// Builds and optimizes the tile's model from the imported model's.
    pub fn build(ir: &Ir, spec: &TileSpec) -> Result<TileModel> {
        let (plan, weight_bytes) = runnable(|| TileBuilder::new(ir)?.build(spec))?;
        Ok(TileModel {
            plan,
            spec: spec.clone(),
            weight_bytes,
        })
    }

    /// Loads and optimizes a tile shipped built ([`export_tile`]) from its NNEF file:
    /// the board needs neither the model nor any weights beyond the tile's.
    pub fn from_nnef_file(path: &std::path::Path, spec: &TileSpec) -> Result<TileModel> {
        let read = || {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let model = nnef()
                .model_for_read(&mut std::io::BufReader::new(file))
                .with_context(|| format!("reading the tile's model {}", path.display()))?;
            ensure!(
                model.inputs.len() == spec.inputs.len()
                    && model.outputs.len() == spec.outputs.len(),
                "{}: the tile's model takes {} inputs and gives {} outputs, its TileSpec {} \
                 and {}",
                path.display(),
                model.inputs.len(),
                model.outputs.len(),
                spec.inputs.len(),
                spec.outputs.len()
            );
            Ok(model)
        };
        let (plan, weight_bytes) = runnable(read)?;
        Ok(TileModel {
            plan,
            spec: spec.clone(),
            weight_bytes,
        })
    }

    /// The program this tile runs.
    pub fn spec(&self) -> &TileSpec {
        &self.spec
    }

    /// Bytes of its weights (the constants of its model).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Runs the tile on its input strips (in [`TileSpec::inputs`] order).
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        ensure!(
            inputs.len() == self.spec.inputs.len(),
            "the tile takes {} input strips, {} given",
            self.spec.inputs.len(),
            inputs.len()
        );
        let outputs = self
            .plan
            .run(inputs.into_iter().map(|t| t.into_tvalue()).collect())?;
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }

    /// Runs the tile like [`TileModel::run`], timing every node of its tract plan on `clock`:
    /// returns the outputs and, per node, the time its evaluation took
    /// ([`crate::emulate::run_nodes_timed`]).
    pub fn run_timed(
        &self,
        inputs: Vec<Tensor>,
        clock: fn() -> Result<std::time::Duration>,
    ) -> Result<(Vec<Tensor>, Vec<std::time::Duration>)> {
        ensure!(
            inputs.len() == self.spec.inputs.len(),
            "the tile takes {} input strips, {} given",
            self.spec.inputs.len(),
            inputs.len()
        );
        let inputs = inputs.into_iter().map(|t| t.into_tvalue()).collect();
        let (outputs, times) = crate::emulate::run_nodes_timed(&self.plan, inputs, clock)?;
        Ok((
            outputs.into_iter().map(|v| v.into_tensor()).collect(),
            times,
        ))
    }
}

/// A board's tiles, built to ship: the tiles it runs (group, tile index, spec) and,
/// per tile, each phase's model written as NNEF ([`export_tile`], [`TileSpec::phases`]).
pub struct ShippedTiles {
    /// The tiles, as LoadPlan lists them.
    pub tiles: Vec<(usize, usize, TileSpec)>,
    /// Per tile, per phase, its model's NNEF bytes.
    pub phases: Vec<Vec<Vec<u8>>>,
}

impl ShippedTiles {
    /// Builds and writes every phase of `tiles` of a plan for `ir`.
    pub fn build(ir: &Ir, tiles: Vec<(usize, usize, TileSpec)>) -> Result<ShippedTiles> {
        let phases = tiles
            .iter()
            .map(|(group, tile, spec)| {
                spec.phases(ir)
                    .iter()
                    .map(|phase| export_tile(ir, &phase.spec))
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("building tile {tile} of group {group}"))
            })
            .collect::<Result<_>>()?;
        Ok(ShippedTiles { tiles, phases })
    }
}

/// Optimizes the tile's model that `load` makes and makes it runnable. The model is
/// not kept beside its optimized copy (a tile's weights would be held twice); it is
/// made again only when tract cannot optimize it. Also gives the bytes of its constants.
fn runnable(
    load: impl Fn() -> Result<TypedModel>,
) -> Result<(std::sync::Arc<TypedSimplePlan>, u64)> {
    let model = load()?;
    let weight_bytes = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .map(|c| (c.val().len() * c.val().datum_type().size_of()) as u64)
        .sum();
    // tract 0.23.9 fails to optimize some strided convs after a space-to-depth
    // ("Pulling Downsample over Reshape: Invalid axis", declutter too); the typed
    // model runs the same computation unoptimized, only slower.
    let plan = match model.into_optimized() {
        Ok(optimized) => optimized.into_runnable(),
        Err(e) => {
            tracing::warn!("tract could not optimize a tile ({e:#}); it runs unoptimized");
            load()?.into_runnable()
        }
    }
    .context("optimizing the tile")?;
    Ok((plan, weight_bytes))
}

/// The tile `spec` of `ir` built and written as NNEF (a tar, the same bytes for the
/// same tile), for a board that loads it with [`TileModel::from_nnef_file`]
/// (docs/architecture.md, "Shipped tiles").
pub fn export_tile(ir: &Ir, spec: &TileSpec) -> Result<Vec<u8>> {
    let model = TileBuilder::new(ir)?.build(spec)?;
    // NNEF has no operators of the ONNX form that declutter rewrites (StridedSlice,
    // Dropout); a model tract cannot declutter is written as built.
    let mut model = model.clone().into_decluttered().unwrap_or(model);
    explicit_ceil_pools(&mut model)?;
    let bytes = nnef()
        .write_to_tar_with_config(&model, vec![], false, true)
        .context("writing the tile's model as NNEF")?;
    Ok(bytes)
}

/// tract's NNEF reader and writer: its core ops, the ONNX ones, and the exact GELU,
/// which tract 0.23.9 writes under no name.
fn nnef() -> &'static tract_nnef::framework::Nnef {
    use tract_nnef::internal::Registry;
    use tract_onnx::tract_core::ops::nn::GeluExact;
    static NNEF: std::sync::OnceLock<tract_nnef::framework::Nnef> = std::sync::OnceLock::new();
    NNEF.get_or_init(|| {
        let mut legion = Registry::new("legion");
        legion.register_unit_element_wise("legion_gelu_exact", &GeluExact {});
        use tract_onnx::WithOnnx;
        tract_nnef::nnef().with_onnx().with_registry(legion)
    })
}

/// Rewrites every pool of `model` in ONNX's ceil mode to explicit pads that give the
/// same outputs (NNEF has no ceil mode): the pads after each axis grow to cover the
/// last window. A max ignores pads; an average that counts them is refused.
fn explicit_ceil_pools(model: &mut TypedModel) -> Result<()> {
    for id in 0..model.nodes.len() {
        let (spec, counts_pads) = if let Some(p) = model.node(id).op_as::<MaxPool>() {
            (&p.pool_spec, false)
        } else if let Some(p) = model.node(id).op_as::<SumPool>() {
            (&p.pool_spec, p.count_include_pad)
        } else {
            continue;
        };
        let PaddingSpec::ExplicitOnnxPool(before, after, true) = &spec.padding else {
            continue;
        };
        let node = model.node(id);
        let input = model
            .outlet_fact(node.inputs[0])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let output = model
            .outlet_fact(OutletId::new(id, 0))?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let (Some(input), Some(output)) = (input, output) else {
            bail!(
                "pool {}: ceil mode over a shape that is not concrete",
                node.name
            );
        };
        let (input, output) = (
            spec.data_format.shape(input)?,
            spec.data_format.shape(output)?,
        );
        let mut grown = after.clone();
        for (axis, grown) in grown.iter_mut().enumerate() {
            let window = (spec.kernel_shape[axis] - 1) * spec.dilation(axis) + 1;
            let covered = (output.hw_dims()[axis] - 1) * spec.stride(axis) + window;
            *grown = (*grown).max(covered.saturating_sub(input.hw_dims()[axis] + before[axis]));
        }
        ensure!(
            !counts_pads || grown == *after,
            "pool {}: an average in ceil mode that counts its pads cannot be written as NNEF",
            node.name
        );
        let padding = PaddingSpec::Explicit(before.clone(), grown);
        let node = model.node_mut(id);
        if let Some(p) = node.op_as::<MaxPool>() {
            let pool_spec = PoolSpec {
                padding,
                ..p.pool_spec.clone()
            };
            node.op = Box::new(MaxPool {
                pool_spec,
                ..p.clone()
            });
        } else if let Some(p) = node.op_as::<SumPool>() {
            let pool_spec = PoolSpec {
                padding,
                ..p.pool_spec.clone()
            };
            node.op = Box::new(SumPool {
                pool_spec,
                ..p.clone()
            });
        }
    }
    Ok(())
}

/// A slice of a tensor a tile holds: the tensor, its rows and, for a depthwise conv's
/// read, the axis and range of its channels.
type SliceKey = (TensorRef, Rows, Option<(usize, Rows)>);

/// Copies stages of the imported model into a new model over strips.
struct TileBuilder<'a> {
    ir: &'a Ir,
    model: TypedModel,
    /// Tensors available in the tile: outlet, the rows it holds and, for a stage split
    /// by channels, its channels.
    tensors: HashMap<TensorRef, (OutletId, Rows, Option<Rows>)>,
    /// Constants already copied, by source outlet and the channel slice taken of it.
    consts: HashMap<(OutletId, Option<(usize, Rows)>), OutletId>,
    /// Slices already wired.
    slices: HashMap<SliceKey, OutletId>,
}

impl<'a> TileBuilder<'a> {
    fn new(ir: &'a Ir) -> Result<Self> {
        ensure!(
            ir.has_model(),
            "building a tile needs the imported model, not its shapes alone"
        );
        let model = TypedModel {
            symbols: ir.model().symbols.clone(),
            ..TypedModel::default()
        };
        Ok(TileBuilder {
            ir,
            model,
            tensors: HashMap::new(),
            consts: HashMap::new(),
            slices: HashMap::new(),
        })
    }

    fn build(mut self, spec: &TileSpec) -> Result<TypedModel> {
        for (i, input) in spec.inputs.iter().enumerate() {
            // A tensor without a row axis (after a barrier) is always received whole;
            // the summed partial products of a tile in parts hold its channels only.
            let shape = spec.input_shape(self.ir, i);
            let channels = spec.summed(input.tensor).and_then(|st| st.channels);
            let src = self
                .model
                .add_source(format!("strip{i}"), f32::fact(&shape))?;
            self.tensors
                .insert(input.tensor, (src, input.rows, channels));
        }
        for st in &spec.stages {
            let stage = self.ir.stage(st.stage);
            let built = match (st.part, st.summed) {
                (Some(rows), _) => self.part_product(stage, st, rows),
                (None, true) => match self.tensors.get(&TensorRef::Stage(stage.id)) {
                    Some(&(summed, _, _)) => self.copy_nodes(stage, st, Some(summed)),
                    None => Err(anyhow::anyhow!("the summed partial products are no input")),
                },
                (None, false) => self.copy_nodes(stage, st, None),
            };
            built.with_context(|| {
                format!("building the tile of stage {} ({})", stage.id, stage.name)
            })?;
        }
        let mut outputs = vec![];
        for out in &spec.outputs {
            let r = TensorRef::Stage(out.stage);
            match self.tensors.get(&r) {
                // A stage split by channels sends all it computed.
                Some(&(outlet, rows, Some(channels))) => {
                    ensure!(
                        out.rows == rows && out.channels == Some(channels),
                        "{r:?}: rows {} channels {:?} sent, the tile computes rows {rows} \
                         channels {channels}",
                        out.rows,
                        out.channels
                    );
                    outputs.push(outlet);
                }
                _ => {
                    ensure!(
                        out.channels.is_none(),
                        "{r:?}: channels sent of a stage not split by them"
                    );
                    outputs.push(self.slice(r, out.rows, None)?);
                }
            }
        }
        self.model.select_output_outlets(&outputs)?;
        Ok(self.model)
    }

    /// The outlet holding exactly `rows` of tensor `r` and, when given, only the
    /// `channels` (axis, range) of it that a depthwise conv split by channels reads,
    /// slicing what the tile holds. A tensor the tile computed split by channels is
    /// read on exactly those channels.
    fn slice(
        &mut self,
        r: TensorRef,
        rows: Rows,
        channels: Option<(usize, Rows)>,
    ) -> Result<OutletId> {
        let (outlet, held, held_channels) = *self
            .tensors
            .get(&r)
            .with_context(|| format!("{r:?} is not in the tile"))?;
        ensure!(
            held_channels.is_none() || held_channels == channels.map(|(_, c)| c),
            "{r:?} is computed on channels {held_channels:?}; a tile reads them alone"
        );
        if let Some(w) = self.slices.get(&(r, rows, channels)) {
            return Ok(*w);
        }
        let mut wire = outlet;
        if let Some(h) = self.ir.tensor(r).h_axis {
            ensure!(
                held.contains(rows),
                "{r:?}: rows {rows} wanted, the tile holds {held}"
            );
            if held != rows {
                let name = format!("{r:?}.rows{}_{}", rows.start, rows.end);
                let op = Slice::new(h, rows.start - held.start, rows.end - held.start);
                wire = self.model.wire_node(name, op, &[wire])?[0];
            }
        }
        if let (Some((axis, c)), None) = (channels, held_channels) {
            let name = format!(
                "{r:?}.rows{}_{}.ch{}_{}",
                rows.start, rows.end, c.start, c.end
            );
            wire = self
                .model
                .wire_node(name, Slice::new(axis, c.start, c.end), &[wire])?[0];
        }
        self.slices.insert((r, rows, channels), wire);
        Ok(wire)
    }

    /// The partial product of matmul stage `stage` (its anchor alone) over `rows` of the
    /// tensor its input flattens ([`legion_ir::RowProduct`]): those rows flattened, times
    /// the matching rows of the weights, on the tile's channels.
    fn part_product(
        &mut self,
        stage: &Stage,
        st: &legion_plan::TileStage,
        rows: Rows,
    ) -> Result<()> {
        let src = self.ir.model();
        let [TensorRef::Stage(flatten)] = stage.inputs[..] else {
            bail!("a product in parts reads one flattened tensor");
        };
        let product = self
            .ir
            .row_product(flatten, stage.id)
            .context("the stage does not multiply a flatten of a tensor with rows")?;
        let tensor = self.ir.stage(flatten).inputs[0];
        let info = self.ir.tensor(tensor).clone();
        let h = info.h_axis.context("a product in parts reads rows")?;
        let strip = self.slice(tensor, rows, None)?;
        let shape = info.strip_shape(rows);
        let flat: usize = shape[1..].iter().product();
        let name = format!(
            "{}.rows{}_{}",
            src.node(product.node).name,
            rows.start,
            rows.end
        );
        let op = AxisOp::Reshape(
            1,
            shape[1..].iter().map(|d| d.to_dim()).collect(),
            tvec![flat.to_dim()],
        );
        let flat = self
            .model
            .wire_node(format!("{name}.flatten"), op, &[strip])?[0];
        // The weights of the tile's channels, then of these rows: per position before
        // the row axis, one run of `rows.len() * inner` elements.
        let node = src.node(product.node);
        let weights = src
            .outlet_fact(node.inputs[product.slot])?
            .konst
            .clone()
            .context("the weights are constant")?;
        let cut = self
            .ir
            .channel_consts(stage.id)
            .into_iter()
            .find(|c| c.node == product.node && c.slot == product.slot)
            .zip(st.channels);
        let weights = match cut {
            Some((c, channels)) => weights.slice(c.axis, channels.start, channels.end)?,
            None => (*weights).clone(),
        };
        let (outer, height): (usize, usize) = (info.shape[1..h].iter().product(), info.shape[h]);
        let inner: usize = info.shape[h + 1..].iter().product();
        let runs = (0..outer)
            .map(|o| {
                let at = |r: usize| (o * height + r) * inner;
                weights.slice(product.axis, at(rows.start), at(rows.end))
            })
            .collect::<TractResult<Vec<_>>>()?;
        let weights = Tensor::stack_tensors(product.axis, &runs)?;
        let weights = self.model.add_const(format!("{name}.weights"), weights)?;
        let mut inputs = tvec![flat, flat];
        inputs[product.slot] = weights;
        let out = self.model.wire_node(name, node.op.clone(), &inputs)?[0];
        self.tensors
            .insert(TensorRef::Stage(stage.id), (out, st.computed, st.channels));
        Ok(())
    }

    /// Copies `stage`'s nodes into the tile, reading the strips it holds; with
    /// `summed`, the anchor's output is that outlet (a tile in parts sums its partial
    /// products) and only the later nodes are copied.
    fn copy_nodes(
        &mut self,
        stage: &Stage,
        st: &legion_plan::TileStage,
        summed: Option<OutletId>,
    ) -> Result<()> {
        let src = self.ir.model();
        let model_input = src.input_outlets()?[0];
        let mut mapped: HashMap<OutletId, OutletId> = HashMap::new();
        if let Some(summed) = summed {
            mapped.insert(OutletId::new(stage.nodes[0], 0), summed);
        }
        let channel_consts = match st.channels {
            Some(_) => self.ir.channel_consts(stage.id),
            None => vec![],
        };
        ensure!(
            st.channels.is_none() || !channel_consts.is_empty(),
            "the stage does not split by channels"
        );
        // A depthwise conv split by channels reads its own channels of its input.
        let own_channels = match (stage.channels, st.channels) {
            (Some(split), Some(c)) if split.depthwise => Some((split.axis, c)),
            _ => None,
        };
        for (n, &id) in stage.nodes.iter().enumerate() {
            if n == 0 && summed.is_some() {
                continue;
            }
            let node = src.node(id);
            let mut inputs = tvec![];
            for (slot, o) in node.inputs.iter().enumerate() {
                let wire = if let Some(w) = mapped.get(o) {
                    *w
                } else if let Some(k) = src.outlet_fact(*o)?.konst.clone() {
                    let cut = channel_consts
                        .iter()
                        .find(|c| c.node == id && c.slot == slot)
                        .zip(st.channels)
                        .map(|(c, channels)| (c.axis, channels));
                    self.konst(*o, k, cut)?
                } else {
                    let r = if *o == model_input {
                        TensorRef::Input
                    } else {
                        let producer = self
                            .ir
                            .stages
                            .iter()
                            .find(|s| s.output_outlet() == *o)
                            .context("reads a tensor that is not a stage output")?;
                        TensorRef::Stage(producer.id)
                    };
                    let i = stage
                        .inputs
                        .iter()
                        .position(|x| *x == r)
                        .context("undeclared stage input")?;
                    self.slice(r, st.reads[i].rows, own_channels)?
                };
                inputs.push(wire);
            }
            if stage.is_splittable() && st.channels.is_none() && node.op.is::<TypedBinOp>() {
                self.slice_row_constants(node, &mut inputs, st.computed)?;
            }
            // The anchor gets the tile's pads; every reshape of the stage (stacked
            // space-to-depth ops fuse into one stage) gets the strip's height. A barrier
            // runs whole, so its ops stay exactly as the model has them.
            let op = if !stage.is_splittable() {
                node.op.clone()
            } else if let (0, StageKind::Subsample { step, .. }) = (n, &stage.kind) {
                // The strip starts at the first row taken: every step-th row of it.
                let h = stage.input_shapes[0]
                    .h_axis
                    .context("a subsample has rows")?;
                let data = (0..node.inputs.len())
                    .find(|&i| {
                        src.outlet_fact(node.inputs[i])
                            .is_ok_and(|f| f.konst.is_none())
                    })
                    .context("a subsample reads one tensor")?;
                inputs = tvec![inputs[data]];
                Box::new(Downsample::new(h, *step as isize, 0))
            } else if n == 0 {
                self.retarget(stage, st, node, &inputs)?
            } else if let Some(AxisOp::Reshape(at, from, to)) = node.op.downcast_ref::<AxisOp>() {
                let tile_in = self.model.outlet_fact(inputs[0])?.shape.to_tvec();
                Box::new(retarget_reshape(*at, from, to, &tile_in)?)
            } else {
                node.op.clone()
            };
            // A conv split by channels computes only its slice of them; a depthwise one
            // reads as many, one group each.
            let op = match (n, st.channels, op.downcast_ref::<Conv>()) {
                (0, Some(channels), Some(conv)) if own_channels.is_some() => Box::new(Conv {
                    pool_spec: PoolSpec {
                        input_channels: channels.len(),
                        output_channels: channels.len(),
                        ..conv.pool_spec.clone()
                    },
                    group: channels.len(),
                    ..conv.clone()
                }),
                (0, Some(channels), Some(conv)) => Box::new(Conv {
                    pool_spec: PoolSpec {
                        output_channels: channels.len(),
                        ..conv.pool_spec.clone()
                    },
                    ..conv.clone()
                }),
                _ => op,
            };
            let outs = self.model.wire_node(&node.name, op, &inputs)?;
            for (slot, w) in outs.into_iter().enumerate() {
                mapped.insert(OutletId::new(id, slot), w);
            }
        }
        let out = mapped[&stage.output_outlet()];
        if let Some(h) = stage.output.h_axis {
            let got = self.model.outlet_fact(out)?.shape[h]
                .to_usize()
                .context("symbolic tile height")?;
            ensure!(
                got == st.computed.len(),
                "the tile computes {got} rows where {} were planned ({})",
                st.computed.len(),
                stage.kind.short_name()
            );
        }
        if let (Some(split), Some(channels)) = (stage.channels, st.channels) {
            let got = self.model.outlet_fact(out)?.shape[split.axis]
                .to_usize()
                .context("symbolic channel count")?;
            ensure!(
                got == channels.len() && channels.end <= split.count,
                "the tile computes {got} channels where {channels} of {} were planned",
                split.count
            );
        }
        self.tensors
            .insert(TensorRef::Stage(stage.id), (out, st.computed, st.channels));
        Ok(())
    }

    /// A constant operand of a row-local binary op that holds one value per row of the
    /// whole tensor (YOLO's anchor grid) is sliced to the rows the tile computes: the
    /// axis where a data operand's strip is shorter than the whole tensor.
    fn slice_row_constants(
        &mut self,
        node: &TypedNode,
        inputs: &mut TVec<OutletId>,
        computed: Rows,
    ) -> Result<()> {
        let src = self.ir.model();
        let facts = node
            .inputs
            .iter()
            .map(|o| src.outlet_fact(*o))
            .collect::<TractResult<Vec<_>>>()?;
        let strip_axis = (0..inputs.len())
            .filter(|&j| facts[j].konst.is_none())
            .find_map(|j| {
                let tile = self.model.outlet_fact(inputs[j]).ok()?.shape.to_tvec();
                let whole = &facts[j].shape;
                let differ: Vec<usize> = (0..whole.rank())
                    .filter(|&a| tile.get(a) != Some(&whole[a]))
                    .collect();
                match differ[..] {
                    [a] => Some((a, whole[a].clone(), whole.rank(), tile[a].clone())),
                    _ => None,
                }
            });
        let Some((axis, height, rank, rows)) = strip_axis else {
            return Ok(());
        };
        ensure!(
            rows == computed.len().to_dim(),
            "{}: a strip of {rows} rows where the stage computes {computed}",
            node.name
        );
        for (i, fact) in facts.iter().enumerate() {
            if fact.konst.is_none() || fact.rank() != rank || fact.shape[axis] != height {
                continue;
            }
            let name = format!("{}.rows{}_{}", node.name, computed.start, computed.end);
            let op = Slice::new(axis, computed.start, computed.end);
            inputs[i] = self.model.wire_node(name, op, &[inputs[i]])?[0];
        }
        Ok(())
    }

    /// Constant `o` of the parent model, or its slice `channels` along `axis` when a
    /// stage split by channels reads one value per channel of it: the tile holds only
    /// its slice of the weights.
    fn konst(
        &mut self,
        o: OutletId,
        k: std::sync::Arc<Tensor>,
        cut: Option<(usize, Rows)>,
    ) -> Result<OutletId> {
        if let Some(w) = self.consts.get(&(o, cut)) {
            return Ok(*w);
        }
        let mut name = format!("{}.const{}", self.ir.model().node(o.node).name, o.slot);
        let k = match cut {
            Some((axis, channels)) => {
                name += &format!(".ch{}_{}", channels.start, channels.end);
                k.slice(axis, channels.start, channels.end)?
                    .into_arc_tensor()
            }
            None => k,
        };
        let w = self.model.add_const(name, k)?;
        self.consts.insert((o, cut), w);
        Ok(w)
    }

    /// The anchor op for a strip: windows get the tile's pads on H; reshapes get the
    /// strip's height.
    fn retarget(
        &self,
        stage: &Stage,
        st: &legion_plan::TileStage,
        node: &TypedNode,
        inputs: &[OutletId],
    ) -> Result<Box<dyn TypedOp>> {
        let op = &node.op;
        let read = st.reads.first().copied();
        let pads = |ps: &PoolSpec| -> Result<PoolSpec> {
            let read = read.context("a window stage reads one input")?;
            let w = stage.kind.window().context("window geometry")?;
            // Index 0 of the stage's window is the rows' axis: H, or W for a conv whose
            // rows are on its W axis.
            let rows_on_w = stage.input_shapes[0].h_axis == Some(ps.data_format.h_axis() + 1);
            let (before, after) = if rows_on_w {
                (
                    tvec![w.pad_before[1], read.pad_top],
                    tvec![w.pad_after[1], read.pad_bottom],
                )
            } else {
                (
                    tvec![read.pad_top, w.pad_before[1]],
                    tvec![read.pad_bottom, w.pad_after[1]],
                )
            };
            let padding = match ps.padding {
                PaddingSpec::ExplicitOnnxPool(_, _, ceil) => {
                    PaddingSpec::ExplicitOnnxPool(before, after, ceil)
                }
                _ => PaddingSpec::Explicit(before, after),
            };
            Ok(PoolSpec {
                padding,
                ..ps.clone()
            })
        };
        if let Some(conv) = op.downcast_ref::<Conv>() {
            return Ok(Box::new(Conv {
                pool_spec: pads(&conv.pool_spec)?,
                ..conv.clone()
            }));
        }
        if let Some(pool) = op.downcast_ref::<MaxPool>() {
            return Ok(Box::new(MaxPool {
                pool_spec: pads(&pool.pool_spec)?,
                ..pool.clone()
            }));
        }
        if let Some(pool) = op.downcast_ref::<SumPool>() {
            return Ok(Box::new(SumPool {
                pool_spec: pads(&pool.pool_spec)?,
                ..pool.clone()
            }));
        }
        if let Some(AxisOp::Reshape(at, from, to)) = op.downcast_ref::<AxisOp>() {
            let tile_in = self.model.outlet_fact(inputs[0])?.shape.to_tvec();
            return Ok(Box::new(retarget_reshape(*at, from, to, &tile_in)?));
        }
        Ok(op.clone())
    }
}

/// A reshape of `from` dims (at axis `at`) into `to` dims, rewritten for an input whose
/// dims differ in one axis (the strip's height): the outermost `to` dim that the changed
/// axis splits into scales with it.
fn retarget_reshape(at: usize, from: &[TDim], to: &[TDim], input: &[TDim]) -> Result<AxisOp> {
    let from_now: TVec<TDim> = input[at..at + from.len()].iter().cloned().collect();
    let changed: Vec<usize> = (0..from.len())
        .filter(|&i| from[i] != from_now[i])
        .collect();
    match changed[..] {
        [] => Ok(AxisOp::Reshape(at, from.into(), to.into())),
        [axis] => {
            let dims = |v: &[TDim]| {
                v.iter()
                    .map(|d| d.to_usize().context("symbolic reshape dim"))
                    .collect::<Result<Vec<usize>>>()
            };
            let (old_from, now, mut new_to) = (dims(from)?, dims(&from_now)?, dims(to)?);
            // The `to` dim starting where the changed axis starts holds its outermost factor.
            let before: usize = old_from[..axis].iter().product();
            let mut prefix = 1;
            let j = (0..new_to.len())
                .find(|&j| {
                    let hit = prefix == before;
                    prefix *= new_to[j];
                    hit && new_to[j] > 1
                })
                .context("reshape does not split the row axis on a dim boundary")?;
            let (old, new) = (old_from[axis], now[axis]);
            if (new_to[j] * new) % old != 0 {
                bail!("a strip of {new} rows cannot be reshaped like {old} rows");
            }
            new_to[j] = new_to[j] * new / old;
            Ok(AxisOp::Reshape(
                at,
                from_now,
                new_to.into_iter().map(|d| d.to_dim()).collect(),
            ))
        }
        _ => bail!("reshape over more than one changed axis"),
    }
}
