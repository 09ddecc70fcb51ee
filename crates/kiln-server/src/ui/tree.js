// The lineage model: template → sandboxes → snapshots → copies resumed from them and forks → their
// snapshots. Sandboxes and snapshots that were deleted but still have descendants appear as ghosts.

export function buildTree(templates, sandboxes, snapshots) {
  const nodes = new Map();
  const node = (key, kind, label, data) => {
    if (!nodes.has(key)) nodes.set(key, { key, kind, label, data, children: [], parent: null });
    return nodes.get(key);
  };
  for (const t of templates) node("t:" + t, "template", t, null);
  const sbById = new Map(sandboxes.map(s => [s.id, s]));
  const snapById = new Map(snapshots.map(s => [s.id, s]));
  for (const s of sandboxes) node("sb:" + s.id, "sandbox", s.name, s);
  for (const s of snapshots) node("sn:" + s.id, "snapshot", s.id, s);
  const link = (child, parentKey, fallback) => {
    const p = nodes.get(parentKey) || fallback();
    child.parent = p;
    p.children.push(child);
  };
  const template = name => node("t:" + name, "template", name, null);
  const ghostSandbox = (id, name, tmpl) => {
    const key = "sb:" + id;
    if (!nodes.has(key)) {
      const g = node(key, "ghost", (name || id) + " (deleted)", { id, template: tmpl });
      link(g, "t:" + tmpl, () => template(tmpl));
    }
    return nodes.get(key);
  };
  for (const s of snapshots) {
    link(nodes.get("sn:" + s.id), "sb:" + s.sandbox_id,
      () => ghostSandbox(s.sandbox_id, s.sandbox_name, s.template));
  }
  for (const s of sandboxes) {
    const me = nodes.get("sb:" + s.id);
    let parent = "t:" + s.template;
    if (s.forked_from) parent = "sb:" + s.forked_from;
    else if (s.origin.startsWith("snapshot:") && snapById.has(s.origin.slice(9))) parent = "sn:" + s.origin.slice(9);
    else if (s.origin.startsWith("template:")) parent = "t:" + s.origin.slice(9);
    link(me, parent, () => s.forked_from && !sbById.has(s.forked_from)
      ? ghostSandbox(s.forked_from, null, s.template) : template(s.template));
  }
  const roots = [...nodes.values()].filter(n => n.kind === "template");
  const order = (a, b) => (a.data?.created_at || "").localeCompare(b.data?.created_at || "");
  for (const n of nodes.values()) n.children.sort(order);
  roots.sort((a, b) => a.label.localeCompare(b.label));
  return { roots, nodes };
}

// What deleting a snapshot gives back. A copy resumed from it (or a sandbox rolled back to it) and a diff
// built on it keep links to its files, so then less is freed.
export function deleteEstimate(snap, sandboxes, snapshots) {
  const users = sandboxes.filter(s => s.origin === "snapshot:" + snap.id || s.restored_from === snap.id);
  const diffs = snapshots.filter(s => s.parent === "snapshot:" + snap.id);
  return { bytes: snap.size_bytes, users: users.map(s => s.name), diffs: diffs.map(s => s.id), shared: users.length + diffs.length > 0 };
}

// Bytes of all snapshots at or below a node.
export function subtreeBytes(n) {
  let total = n.kind === "snapshot" ? n.data.size_bytes : 0;
  for (const c of n.children) total += subtreeBytes(c);
  return total;
}

export function fmtBytes(b) {
  if (b == null) return "?";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b) + " " + u[i];
}
