"""Draft trees: construction by sampling without replacement (RSD), tree attention masks, position ids,
and the torch-free shapes and try counting the router reads.

Recursive Speculative Decoding (Jeon et al. 2024, arXiv 2402.14160) drafts the siblings of every node
*without replacement*, which keeps the tree diverse and lets the verifier (`specfleet.verify.verify_tree`)
run recursive rejection sampling over them losslessly:
- RSD-C: Gumbel-Top-k at every node, a constant branching factor per level (`build.build_tree_rsd_c`);
- RSD-S: Stochastic Beam Search over the draft model (Kool et al. 2019, "Stochastic Beams and Where to Find
  Them"), keeping the b most likely sampled-without-replacement sequences per level and so truncating
  unlikely branches early (`build.build_tree_rsd_s`).
Deterministic drafters that offer several distinct candidates per node (n-gram lookups) make trees with
point-mass draft distributions (`structure.point_mass_tree`, `structure.tree_from_paths`). The target scores
every node in one forward pass (SpecInfer, Miao et al. 2024): each node attends to the committed prefix and
to its own ancestors (`structure.tree_attention_mask`) at position prefix length + depth
(`structure.tree_position_ids`).

Modules, by concern (import the one you need; this package imports nothing, so the torch-free `shapes`
loads without torch):
- `specfleet.trees.structure`: `DraftTree`, its depths, attention mask, position ids and sibling links,
  point-mass trees (torch);
- `specfleet.trees.without_replacement`: Gumbel-Top-k, the distribution each sibling was drawn from,
  conditional Gumbel (torch);
- `specfleet.trees.build`: RSD-C, RSD-S and iid construction (torch);
- `specfleet.trees.shapes`: `TreeShape`, node budgets, try counting and the sentinels (no torch).

Glossary (each word means one thing only):
- *root*: the last committed token. It is not a node; its children have parent `shapes.ROOT_PARENT` and
  depth 0.
- *node*: a draft token of the tree. Per batch row nodes are numbered 0..num_nodes-1 with every parent
  before its children, and the children of a node appear in the order they were drawn; slots past a row's
  nodes hold `shapes.PAD_TOKEN` (and parent `shapes.ROOT_PARENT`), and a node index that names no node is
  `shapes.NO_NODE`.
- *first try*: the first-drawn child of a node (of the root, or of an accepted node): the child recursive
  rejection tries first, drawn from the draft as a chain's token is.
- *later sibling*: any child of a node after its first try. It is tried only after every earlier sibling was
  rejected, against the target's residual, so it is accepted less often than a first try.
- *accepted*, *recovered* and *bonus* token: the outcome of a step, as defined in `specfleet.verify`.
- `draft_probs`: always a dense tensor [..., vocab] of the distribution a draft token was drawn from.
- the wire's *top-K pairs* (`draft_top_k`): the same distributions as they travel between services, the
  draft's K most probable (token id, probability) pairs per node (`specfleet.sampling.top_k_pairs`).
"""
