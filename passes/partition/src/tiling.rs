//! Tiling a fused group for a cut of its output rows: what each device computes,
//! receives and sends, with pads and alpha.

use crate::rows::{InputRows, row_map};
use legion_ir::Rows;
use legion_ir::{Ir, StageId, TensorRef};
use legion_plan::{TileInput, TileOutput, TileRead, TileSpec, TileStage};
use rustc_hash::FxHasher;
use serde::Serialize;
use smallvec::SmallVec;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

/// A fused group: the contiguous stages `first..=last` in topological order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Group {
    /// First stage.
    pub first: StageId,
    /// Last stage; its output rows are the ones cut into strips.
    pub last: StageId,
}

impl Group {
    /// Stages `first..=last`.
    pub fn new(first: usize, last: usize) -> Group {
        Group {
            first: StageId(first as u32),
            last: StageId(last as u32),
        }
    }

    /// The stage ids, in order.
    pub fn stages(self) -> impl DoubleEndedIterator<Item = StageId> {
        (self.first.0..=self.last.0).map(StageId)
    }

    /// True when `s` is in the group.
    pub fn contains(self, s: StageId) -> bool {
        self.first <= s && s <= self.last
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}..{}", self.first, self.last)
    }
}

/// Why a group or a cut cannot be tiled.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// The range is empty or runs past the model.
    #[error("group {first}..{last} is not a range of stages 0..{count}")]
    BadGroup {
        /// First stage asked for.
        first: usize,
        /// Last stage asked for.
        last: usize,
        /// Number of stages in the model.
        count: usize,
    },
    /// A barrier stage cannot be split.
    #[error("stage {stage} ({name}) is a barrier ({reason}); it cannot be inside a split group")]
    Barrier {
        /// The stage.
        stage: StageId,
        /// Its name.
        name: String,
        /// Why it is a barrier.
        reason: String,
    },
    /// A channel group must end with a stage that splits by channels.
    #[error("stage {stage} ({name}) does not split by output channels or neurons")]
    NoChannels {
        /// The stage.
        stage: StageId,
        /// Its name.
        name: String,
    },
    /// A channel group would run a conv or matmul whole on every device.
    #[error(
        "stage {stage} ({name}) multiplies; in a channel group every device would run it whole"
    )]
    Replicated {
        /// The stage.
        stage: StageId,
        /// Its name.
        name: String,
    },
    /// A stage after a channel group's first split stage reads more than its own
    /// device's channels of the one before.
    #[error(
        "stage {stage} ({name}) follows the channel split but is no depthwise conv of the \
         stage before it; it would need every device's channels"
    )]
    NotPerChannel {
        /// The stage.
        stage: StageId,
        /// Its name.
        name: String,
    },
    /// A stage that every device of a channel group runs whole is read after it.
    #[error(
        "stage {stage} ({name}) is read after the group; in a channel group only the last stage may be"
    )]
    ReadOutside {
        /// The stage.
        stage: StageId,
        /// Its name.
        name: String,
    },
    /// The strips do not cut `[0, height)` into consecutive ranges.
    #[error("strips {strips:?} do not cut the {height} output rows of stage {stage} in order")]
    BadStrips {
        /// The group's last stage.
        stage: StageId,
        /// Its output height.
        height: usize,
        /// The strips given.
        strips: Vec<Rows>,
    },
}

/// What one stage does on one device inside a group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageInTile {
    /// The stage.
    pub stage: StageId,
    /// Output rows the device computes (its own strip plus the halo later stages need).
    pub computed: Rows,
    /// Rows and pads read from each data input (a slice of the producer's computed rows).
    pub inputs: SmallVec<[InputRows; 2]>,
    /// Rows the device would compute if the stage ran alone at the same share (its
    /// strip, widened to whole blocks where the stage computes blocks).
    pub alone: Rows,
    /// Redundant rows: `computed - alone` (rows another device computes too).
    pub halo_rows: usize,
    /// `computed / alone` (docs/architecture.md, "Alpha"); `None` when the device owns no rows here.
    pub alpha: Option<f64>,
    /// True for a reduction the group's devices combine: the device reduces the rows of
    /// the input it owns (`inputs[0]`) into a partial result.
    pub partial: bool,
}

/// A tensor entering the group and the strip of it a device receives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Received {
    /// The tensor.
    pub tensor: TensorRef,
    /// Rows received, halo included.
    pub rows: Rows,
    /// `rows / rows received were its first reader run alone at the same share`.
    pub alpha_in: Option<f64>,
}

/// One device's part of a group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tile {
    /// Its slot in the cut given to [`tile`]: the position of its strip, which is the
    /// caller's order of devices (not a cluster device id).
    pub slot: usize,
    /// The device's strip of the group's last stage.
    pub strip: Rows,
    /// Strips of the tensors entering the group, in the group's input order.
    pub received: Vec<Received>,
    /// Per stage of the group, in order.
    pub stages: Vec<StageInTile>,
    /// Strips of the tensors leaving the group, in the group's output order.
    pub sent: Vec<(StageId, Rows)>,
}

impl Tile {
    /// The tile of stage `s`.
    pub fn stage(&self, s: StageId) -> &StageInTile {
        self.stages
            .iter()
            .find(|t| t.stage == s)
            .expect("stage of the group")
    }

    /// The program a worker runs for this tile.
    pub fn spec(&self) -> TileSpec {
        self.view().spec()
    }
}

/// A group tiled for a cut of its output rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tiling {
    /// The group.
    pub group: Group,
    /// Tensors read from outside the group, in first-use order.
    pub inputs: Vec<TensorRef>,
    /// Stages whose output is read after the group or is a model output; the last stage
    /// is always one.
    pub outputs: Vec<StageId>,
    /// One tile per non-empty strip, in slot order.
    pub tiles: Vec<Tile>,
}

/// Checks that `first..=last` is a range of stages of `ir`.
pub(crate) fn stage_range(ir: &Ir, first: usize, last: usize) -> Result<Group, PartitionError> {
    if first > last || last >= ir.stages.len() {
        return Err(PartitionError::BadGroup {
            first,
            last,
            count: ir.stages.len(),
        });
    }
    Ok(Group::new(first, last))
}

/// Checks that `first..=last` is a group of splittable stages of `ir`.
pub fn check_group(ir: &Ir, first: usize, last: usize) -> Result<Group, PartitionError> {
    let group = stage_range(ir, first, last)?;
    for s in group.stages() {
        let stage = ir.stage(s);
        if let legion_ir::Split::Barrier(reason) = &stage.split {
            if combined_inside(ir, group, s) {
                continue;
            }
            let reason = match stage.partial {
                Some(_) => format!(
                    "{reason}; its devices combine it only for stages after it in the group"
                ),
                None => reason.clone(),
            };
            return Err(PartitionError::Barrier {
                stage: s,
                name: stage.name.clone(),
                reason,
            });
        }
    }
    Ok(group)
}

/// Whether a row group may reduce over rows across its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reductions {
    /// Every reduction over rows is a barrier (the hub transport cannot combine them).
    Barriers,
    /// Reductions the devices can combine stay inside the group (programs transport).
    Combined,
}

/// True when stage `s` of `group` reduces over rows in a way the group's devices
/// combine (each reduces its own rows, docs/architecture.md, "Reductions across
/// devices"), and only stages after it in the group read the result.
pub fn combined_inside(ir: &Ir, group: Group, s: StageId) -> bool {
    ir.stage(s).is_combined()
        && s != group.last
        && !ir.outputs.contains(&TensorRef::Stage(s))
        && ir.consumers(s).iter().all(|c| group.contains(*c))
}

/// True when some row group can hold stage `s` as a reduction its devices combine:
/// the smallest such group, from `s` to its last reader, is legal.
pub fn combinable(ir: &Ir, s: StageId) -> bool {
    let last = ir.consumers(s).into_iter().max();
    ir.stage(s).is_combined()
        && last.is_some_and(|last| check_group(ir, s.index(), last.index()).is_ok())
}

/// Every candidate group: runs of splittable stages up to `max_len` long (any length
/// when `None`), ordered by first stage, then length.
pub fn candidate_groups(ir: &Ir, max_len: Option<usize>) -> Vec<Group> {
    let n = ir.stages.len();
    let max_len = max_len.unwrap_or(n).max(1);
    let mut groups = vec![];
    for first in 0..n {
        for last in first..n.min(first + max_len) {
            if check_group(ir, first, last).is_err() {
                break;
            }
            groups.push(Group::new(first, last));
        }
    }
    groups
}

/// Tensors the group reads from outside, and stages whose outputs leave it.
pub fn boundary(ir: &Ir, group: Group) -> (Vec<TensorRef>, Vec<StageId>) {
    let mut inputs = vec![];
    for s in group.stages() {
        for r in &ir.stage(s).inputs {
            let outside = match r {
                TensorRef::Input => true,
                TensorRef::Stage(p) => !group.contains(*p),
            };
            if outside && !inputs.contains(r) {
                inputs.push(*r);
            }
        }
    }
    let outputs = group
        .stages()
        .filter(|s| {
            *s == group.last
                || ir.outputs.contains(&TensorRef::Stage(*s))
                || ir.consumers(*s).iter().any(|c| !group.contains(*c))
        })
        .collect();
    (inputs, outputs)
}

/// Scales a cut of `from` rows to a tensor of `to` rows: cut points move proportionally
/// (rounded down), so the strips still cover `[0, to)` in order.
pub fn scale_cut(strips: &[Rows], from: usize, to: usize) -> Vec<Rows> {
    strips.iter().map(|s| scale_rows(*s, from, to)).collect()
}

/// One strip of [`scale_cut`].
fn scale_rows(strip: Rows, from: usize, to: usize) -> Rows {
    let point = |r: usize| if r == from { to } else { r * to / from };
    Rows::new(point(strip.start), point(strip.end))
}

/// Tiles `group` for `strips`, a cut of the last stage's output rows into one strip per
/// device, in device order. Devices whose strip is empty are dropped.
pub fn tile(ir: &Ir, group: Group, strips: &[Rows]) -> Result<Tiling, PartitionError> {
    GroupTiler::new(ir, group)?.tile(strips)
}

/// A group checked once and its boundary found, ready to tile any cut of its output:
/// what the shares search keeps while it tries many strips of one group.
pub struct GroupTiler<'a> {
    ir: &'a Ir,
    group: Group,
    height: usize,
    inputs: Vec<TensorRef>,
    outputs: Vec<StageId>,
}

impl<'a> GroupTiler<'a> {
    /// Checks that `group` is a run of splittable stages of `ir`.
    pub fn new(ir: &'a Ir, group: Group) -> Result<GroupTiler<'a>, PartitionError> {
        check_group(ir, group.first.index(), group.last.index())?;
        let height = ir.stage(group.last).output.height().expect("splittable");
        let (inputs, outputs) = boundary(ir, group);
        Ok(GroupTiler {
            ir,
            group,
            height,
            inputs,
            outputs,
        })
    }

    /// Output rows of the group's last stage.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Tiles every device of the cut `strips` (see [`tile`]).
    pub fn tile(&self, strips: &[Rows]) -> Result<Tiling, PartitionError> {
        self.check_cut(strips)?;
        let tiles = strips
            .iter()
            .enumerate()
            .filter(|(_, strip)| !strip.is_empty())
            .map(|(slot, strip)| self.slot(slot, *strip))
            .collect();
        Ok(Tiling {
            group: self.group,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            tiles,
        })
    }

    fn check_cut(&self, strips: &[Rows]) -> Result<(), PartitionError> {
        let in_order = strips.first().is_some_and(|s| s.start == 0)
            && strips.last().is_some_and(|s| s.end == self.height)
            && strips.windows(2).all(|w| w[0].end == w[1].start);
        if in_order {
            Ok(())
        } else {
            Err(PartitionError::BadStrips {
                stage: self.group.last,
                height: self.height,
                strips: strips.to_vec(),
            })
        }
    }

    /// Rows of stage `s` a device with `strip` of the last stage owns alone: the strip's
    /// cut points scaled to the stage's height.
    fn alone(&self, s: StageId, strip: Rows) -> Rows {
        let rows = self
            .ir
            .stage(s)
            .output
            .height()
            .expect("splittable stages have rows");
        scale_rows(strip, self.height, rows)
    }

    /// The backward walk (docs/architecture.md, "Row maps and halos") for one device.
    fn slot(&self, slot: usize, strip: Rows) -> Tile {
        let (stages, sent) = self.walk(strip);
        Tile {
            slot,
            strip,
            received: received(self.ir, &stages),
            stages,
            sent,
        }
    }

    /// The stage tiles (in stage order) and the strips sent of a device with `strip`.
    /// A stage's tile depends only on the stages after it in the group, so the tiles of
    /// a group's suffix are those of the suffix tiled alone ([`SuffixTiler`]).
    fn walk(&self, strip: Rows) -> (Vec<StageInTile>, Vec<(StageId, Rows)>) {
        let (ir, group) = (self.ir, self.group);
        let first = group.first.index();
        let sent: Vec<(StageId, Rows)> = self
            .outputs
            .iter()
            .map(|o| (*o, self.alone(*o, strip)))
            .collect();
        // Per stage of the group (by offset from `first`): rows later stages want.
        let mut want = vec![Rows::default(); group.last.index() + 1 - first];
        for (s, rows) in &sent {
            want[s.index() - first] = *rows;
        }
        let mut stages = Vec::with_capacity(want.len());
        for s in group.stages().rev() {
            let stage = ir.stage(s);
            let wanted = want[s.index() - first];
            let partial = stage.is_combined();
            let map = if wanted.is_empty() {
                crate::rows::StageRows {
                    computed: wanted,
                    inputs: SmallVec::new(),
                }
            } else if partial {
                // A reduction combined across the devices: each reads the rows of the
                // input it owns (a cut of them, like the strips), all compute the result.
                let height = stage.input_shapes[0].height().expect("reduces rows");
                crate::rows::StageRows {
                    computed: wanted,
                    inputs: smallvec::smallvec![InputRows {
                        rows: scale_rows(strip, self.height, height),
                        pad_top: 0,
                        pad_bottom: 0,
                    }],
                }
            } else {
                row_map(stage, wanted)
            };
            for (i, r) in stage.inputs.iter().enumerate() {
                if let TensorRef::Stage(p) = r
                    && group.contains(*p)
                {
                    let need = map.inputs.get(i).map(|n| n.rows).unwrap_or_default();
                    let w = &mut want[p.index() - first];
                    *w = w.hull(need);
                }
            }
            // Alone, the stage computes its own strip widened to whole blocks (upsampling).
            let own = self.alone(s, strip);
            let alone = if partial {
                map.computed
            } else if own.is_empty() {
                own
            } else {
                row_map(stage, own).computed
            };
            stages.push(StageInTile {
                stage: s,
                computed: map.computed,
                inputs: map.inputs,
                alone,
                halo_rows: map.computed.len().saturating_sub(alone.len()),
                alpha: ratio(map.computed.len(), alone.len()),
                partial,
            });
        }
        stages.reverse();
        (stages, sent)
    }
}

/// The tensors entering the group made of `stages` (consecutive, in order) that the
/// tile's stages with rows to compute read, and the strips of them they read, in the
/// group's input order ([`boundary`]).
fn received(ir: &Ir, stages: &[StageInTile]) -> Vec<Received> {
    let Some(first) = stages.first().map(|t| t.stage) else {
        return vec![];
    };
    // (tensor, rows read, rows its readers would read alone)
    let mut entering: SmallVec<[(TensorRef, Rows, Rows); 4]> = SmallVec::new();
    // A thin strip may leave a branch of the group with nothing to compute: what only
    // that branch reads is not received.
    for t in stages.iter().filter(|t| !t.computed.is_empty()) {
        let stage = ir.stage(t.stage);
        for (i, r) in stage.inputs.iter().enumerate() {
            let outside = match r {
                TensorRef::Input => true,
                TensorRef::Stage(p) => *p < first,
            };
            if !outside {
                continue;
            }
            let need = t.inputs.get(i).map(|n| n.rows).unwrap_or_default();
            // A tile's alone rows are its own rows widened to whole blocks, which map to
            // the same input rows as its own rows.
            let alone = if t.alone.is_empty() {
                Rows::default()
            } else {
                row_map(stage, t.alone).inputs[i].rows
            };
            match entering.iter_mut().find(|(tensor, _, _)| tensor == r) {
                Some((_, rows, alone_rows)) => {
                    *rows = rows.hull(need);
                    *alone_rows = alone_rows.hull(alone);
                }
                None => entering.push((*r, need, alone)),
            }
        }
    }
    entering
        .into_iter()
        .map(|(tensor, rows, alone)| Received {
            tensor,
            rows,
            alpha_in: ratio(rows.len(), alone.len()),
        })
        .collect()
}

/// One device's tile of a group, borrowed: what the cost pass reads.
#[derive(Clone, Debug)]
pub struct TileView<'t> {
    /// The device's strip of the group's last stage.
    pub strip: Rows,
    /// Strips of the tensors entering the group, in the group's input order.
    pub received: Vec<Received>,
    /// Per stage of the group, in order.
    pub stages: &'t [StageInTile],
    /// Strips of the tensors leaving the group, in the group's output order.
    pub sent: &'t [(StageId, Rows)],
}

impl TileView<'_> {
    /// The program a worker runs for this tile.
    pub fn spec(&self) -> TileSpec {
        TileSpec {
            inputs: self
                .received
                .iter()
                .map(|r| TileInput {
                    tensor: r.tensor,
                    rows: r.rows,
                })
                .collect(),
            stages: self
                .stages
                .iter()
                .filter(|t| !t.computed.is_empty())
                .map(|t| TileStage {
                    stage: t.stage,
                    computed: t.computed,
                    reads: t
                        .inputs
                        .iter()
                        .map(|i| TileRead {
                            rows: i.rows,
                            pad_top: i.pad_top,
                            pad_bottom: i.pad_bottom,
                        })
                        .collect(),
                    channels: None,
                    partial: t.partial,
                    part: None,
                    summed: false,
                })
                .collect(),
            // A short tensor leaving the group besides its last stage may have none of
            // its rows scaled to a thin strip: the tile sends nothing of it.
            outputs: self
                .sent
                .iter()
                .filter(|(_, rows)| !rows.is_empty())
                .map(|(stage, rows)| TileOutput {
                    stage: *stage,
                    rows: *rows,
                    channels: None,
                })
                .collect(),
            parts: vec![],
        }
    }
}

impl Tile {
    /// The tile, borrowed.
    pub fn view(&self) -> TileView<'_> {
        TileView {
            strip: self.strip,
            received: self.received.clone(),
            stages: &self.stages,
            sent: &self.sent,
        }
    }
}

/// Tiles of every group ending at one stage, for one strip at a time: the walk is done
/// once for the longest such group and kept, and a shorter group's tile is its suffix
/// (the shares search of every group ending there asks for the same strips).
pub struct SuffixTiler<'a> {
    tiler: GroupTiler<'a>,
    walks: RefCell<HashMap<Rows, Rc<Walk>, BuildHasherDefault<FxHasher>>>,
}

/// One strip's walk of a [`SuffixTiler`]'s longest group.
#[derive(Debug)]
pub struct Walk {
    stages: Vec<StageInTile>,
    sent: Vec<(StageId, Rows)>,
}

impl Walk {
    /// The tile of the group of the walk's stages from `first` on, for `strip`.
    pub fn view(&self, ir: &Ir, first: StageId, strip: Rows) -> TileView<'_> {
        let from = self.stages.partition_point(|t| t.stage < first);
        let stages = &self.stages[from..];
        TileView {
            strip,
            received: received(ir, stages),
            stages,
            sent: &self.sent[self.sent.partition_point(|(s, _)| *s < first)..],
        }
    }
}

impl<'a> SuffixTiler<'a> {
    /// Tiles for the groups ending at `last`: the longest is the run of splittable
    /// stages ending there, and with [`Reductions::Combined`] also through the
    /// reductions its devices can combine ([`combined_inside`]).
    pub fn new(
        ir: &'a Ir,
        last: StageId,
        reductions: Reductions,
    ) -> Result<SuffixTiler<'a>, PartitionError> {
        let mut first = last.index();
        while first > 0 {
            let before = StageId(first as u32 - 1);
            let splits = check_group(ir, before.index(), before.index()).is_ok()
                || (reductions == Reductions::Combined
                    && combined_inside(ir, Group::new(before.index(), last.index()), before));
            if !splits {
                break;
            }
            first -= 1;
        }
        Ok(SuffixTiler {
            tiler: GroupTiler::new(ir, Group::new(first, last.index()))?,
            walks: RefCell::default(),
        })
    }

    /// The longest group ending at the last stage.
    pub fn longest(&self) -> Group {
        self.tiler.group
    }

    /// Output rows of the last stage.
    pub fn height(&self) -> usize {
        self.tiler.height
    }

    /// The walk of the longest group for `strip`, a non-empty range of the last stage's
    /// rows; walk it once, then view any group ending at the last stage through it.
    pub fn walk(&self, strip: Rows) -> Result<Rc<Walk>, PartitionError> {
        if strip.is_empty() || strip.end > self.tiler.height {
            return Err(PartitionError::BadStrips {
                stage: self.tiler.group.last,
                height: self.tiler.height,
                strips: vec![strip],
            });
        }
        if let Some(w) = self.walks.borrow().get(&strip) {
            return Ok(w.clone());
        }
        let (stages, sent) = self.tiler.walk(strip);
        let walk = Rc::new(Walk { stages, sent });
        self.walks.borrow_mut().insert(strip, walk.clone());
        Ok(walk)
    }
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// The program that runs stage `s` whole on one device: every input whole, the stage's
/// own padding, the whole output sent. Barrier stages run this way.
pub fn whole_stage(ir: &Ir, s: StageId) -> TileSpec {
    whole_group(ir, Group { first: s, last: s })
}

/// The program that runs the stages of `group` whole on one device: every tensor
/// entering the group whole, each stage with its own padding, every tensor leaving the
/// group whole. Barrier stages may be inside: nothing is split. A barrier reads its
/// inputs whole with no tile pads: its ops run exactly as the model declares them
/// (its input's row axis, if any, need not be its window's H axis).
pub fn whole_group(ir: &Ir, group: Group) -> TileSpec {
    let all = |h: Option<usize>| Rows::new(0, h.unwrap_or(0));
    let (inputs, outputs) = boundary(ir, group);
    let stages = group
        .stages()
        .map(|s| {
            let stage = ir.stage(s);
            let computed = all(stage.output.height());
            // A splittable stage reads what its row map says for all its rows (a
            // window's own pads, a strided slice's first row); a barrier reads whole.
            let reads = if stage.is_splittable() && !computed.is_empty() {
                row_map(stage, computed)
                    .inputs
                    .iter()
                    .map(|r| TileRead {
                        rows: r.rows,
                        pad_top: r.pad_top,
                        pad_bottom: r.pad_bottom,
                    })
                    .collect()
            } else {
                stage
                    .input_shapes
                    .iter()
                    .map(|shape| TileRead {
                        rows: all(shape.height()),
                        pad_top: 0,
                        pad_bottom: 0,
                    })
                    .collect()
            };
            TileStage {
                stage: s,
                computed,
                reads,
                channels: None,
                partial: false,
                part: None,
                summed: false,
            }
        })
        .collect();
    TileSpec {
        inputs: inputs
            .into_iter()
            .map(|tensor| TileInput {
                tensor,
                rows: all(ir.tensor(tensor).height()),
            })
            .collect(),
        stages,
        outputs: outputs
            .into_iter()
            .map(|stage| TileOutput {
                stage,
                rows: all(ir.stage(stage).output.height()),
                channels: None,
            })
            .collect(),
        parts: vec![],
    }
}
