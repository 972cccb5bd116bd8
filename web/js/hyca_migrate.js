// Workflows saved with HyCa Apply (Advanced)'s error-adaptive mode, which was removed (README, "Removed:
// the error-adaptive mode"). Its two widgets sat in the middle of the node's list, after interval, warmup
// and final_steps; the frontend restores a saved node's widget values by position, so their values would
// land on fitted and granularity and every later value two widgets too far on. Their values, and the
// unlinked input slots the frontend saves for them, are dropped before the node is configured.
import { app } from "../../../scripts/app.js";

const NODE_ID = "HyCaApply";
const REMOVED = ["adaptive", "adaptive_tolerance"];
const FIRST_REMOVED = 3;

// adaptive (a boolean), then adaptive_tolerance (a number), where the node now has fitted (a boolean) and
// granularity (a string)
function savedWithAdaptive(values) {
  return Array.isArray(values) && typeof values[FIRST_REMOVED] === "boolean"
    && typeof values[FIRST_REMOVED + 1] === "number";
}

function withoutAdaptive(info) {
  if (!savedWithAdaptive(info.widgets_values)) {
    return info;
  }
  const values = info.widgets_values.filter(
    (_, i) => i < FIRST_REMOVED || i >= FIRST_REMOVED + REMOVED.length);
  // only unlinked ones: a slot with a link is left to the frontend with its link
  const inputs = info.inputs?.filter((slot) => !(REMOVED.includes(slot.name) && slot.link == null));
  return { ...info, widgets_values: values, inputs };
}

app.registerExtension({
  name: "hyca.MigrateAdaptiveMode",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_ID) {
      return;
    }
    // configure applies the saved values (onConfigure runs after them)
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      return configure.call(this, withoutAdaptive(info));
    };
  },
});
