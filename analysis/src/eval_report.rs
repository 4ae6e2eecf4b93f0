//! A `huginn eval` report read back for plotting: per task, accuracy at each fixed depth and
//! under each exit, with the mean steps per token it took. Every number is checked before it
//! is drawn (accuracy in [0, 1], depths at least 1, steps finite and at least 1).

use std::path::Path;

use serde_json::Value;

use crate::AnalysisError;

/// One task's results.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResults {
    pub name: String,
    /// `(depth, accuracy)`, by depth.
    pub depths: Vec<(usize, f64)>,
    /// `(label, mean steps per token, accuracy)` of each exit.
    pub exits: Vec<(String, f64, f64)>,
}

/// Reads `report.json`; tasks in the order they first appear.
pub fn read(path: &Path) -> Result<Vec<TaskResults>, AnalysisError> {
    let text = std::fs::read_to_string(path).map_err(AnalysisError::io(path))?;
    let report: Value =
        serde_json::from_str(&text).map_err(|e| AnalysisError::format(path, format!("not JSON: {e}")))?;
    let results = report["results"]
        .as_array()
        .ok_or_else(|| AnalysisError::format(path, "no `results` list: not a huginn eval report"))?;
    let mut tasks: Vec<TaskResults> = Vec::new();
    for (i, result) in results.iter().enumerate() {
        let bad = |what: &str| AnalysisError::format(path, format!("results[{i}]: {what}"));
        let name = result["task"].as_str().ok_or_else(|| bad("no `task` name"))?;
        let acc = result["acc"].as_f64().filter(|a| (0.0..=1.0).contains(a));
        let acc = acc.ok_or_else(|| bad("`acc` is not a number in [0, 1]"))?;
        let steps = result["mean_steps"].as_f64().filter(|s| s.is_finite() && *s >= 1.0);
        let steps = steps.ok_or_else(|| bad("`mean_steps` is not a number of at least 1"))?;
        let index = match tasks.iter().position(|t| t.name == name) {
            Some(index) => index,
            None => {
                tasks.push(TaskResults {
                    name: name.to_string(),
                    depths: Vec::new(),
                    exits: Vec::new(),
                });
                tasks.len() - 1
            }
        };
        let setting = &result["setting"];
        match setting["kind"].as_str() {
            Some("depth") => {
                let depth = setting["steps"].as_u64().filter(|d| *d >= 1);
                let depth = depth.ok_or_else(|| bad("a depth setting without `steps` of at least 1"))?;
                tasks[index].depths.push((depth as usize, acc));
            }
            Some("exit") => {
                let criterion = setting["criterion"]
                    .as_str()
                    .ok_or_else(|| bad("an exit without `criterion`"))?;
                let threshold = setting["threshold"]
                    .as_f64()
                    .ok_or_else(|| bad("an exit without `threshold`"))?;
                tasks[index]
                    .exits
                    .push((format!("{criterion} < {threshold:e}"), steps, acc));
            }
            _ => return Err(bad("`setting.kind` is neither `depth` nor `exit`")),
        }
    }
    if tasks.is_empty() {
        return Err(AnalysisError::format(path, "no results"));
    }
    for task in &mut tasks {
        task.depths.sort_by_key(|(d, _)| *d);
    }
    Ok(tasks)
}
