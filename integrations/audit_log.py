"""The audit's record of a federated run: one JSON file, TensorBoard scalars and a plot.

``audit.json`` is rewritten (atomically) after every round, so a run stopped at
any point keeps every round it audited; ``leakage.png`` is drawn when the run
ends (``close``). TensorBoard gets, per round, the mean of each score over the
clients audited (``audit/<attack>/<metric>``) and the share of clients audited.
"""

from __future__ import annotations

from pathlib import Path

from experiment.runs import write_json_atomic

#: the scores the plot draws, in its panel order (those present in the run)
PLOTTED = ("IRec", "Exact", "LeAcc")


def round_means(clients: list[dict]) -> dict[str, dict[str, float]]:
    """Per method and metric, the mean score over the clients that have one."""
    sums: dict[str, dict[str, list[float]]] = {}
    for client in clients:
        for name, method in client.get("methods", {}).items():
            for metric, value in (method.get("scores") or {}).items():
                if value is not None:
                    sums.setdefault(name, {}).setdefault(metric, []).append(value)
    return {
        name: {metric: sum(values) / len(values) for metric, values in metrics.items()}
        for name, metrics in sums.items()
    }


class AuditLog:
    """Where the audit writes: ``log_dir`` (None: keeps the rounds in memory only)."""

    def __init__(self, log_dir: str | Path | None, describe: dict | None = None):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.describe = dict(describe or {})
        self.rounds: list[dict] = []
        self._writer = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def json_path(self) -> Path | None:
        return None if self.log_dir is None else self.log_dir / "audit.json"

    @property
    def plot_path(self) -> Path | None:
        return None if self.log_dir is None else self.log_dir / "leakage.png"

    def add_round(self, server_round: int, clients: list[dict], seconds: float) -> dict:
        """Record one round's client entries; returns the round's record."""
        entry = {
            "round": server_round,
            "clients": clients,
            "audited": sum(client["status"] == "audited" for client in clients),
            "skipped": sum(client["status"] != "audited" for client in clients),
            "audit_seconds": round(seconds, 4),
            "means": round_means(clients),
        }
        self.rounds.append(entry)
        if self.log_dir is not None:
            self.write()
            self._scalars(entry)
        return entry

    def document(self) -> dict:
        return {**self.describe, "rounds": self.rounds}

    def write(self) -> None:
        write_json_atomic(self.json_path, self.document())

    def _scalars(self, entry: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        step = entry["round"]
        total = entry["audited"] + entry["skipped"]
        if total:
            self._writer.add_scalar("audit/audited_share", entry["audited"] / total, step)
        for name, metrics in entry["means"].items():
            for metric, value in metrics.items():
                self._writer.add_scalar(f"audit/{name}/{metric}", value, step)
        self._writer.flush()

    def close(self) -> None:
        """Draw the plot (where there are scores) and close TensorBoard's writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.log_dir is not None and self.rounds:
            self.plot()

    def plot(self) -> Path | None:
        """``leakage.png``: each score's mean over the audited clients per round, one line per
        attack, with the range over clients as a band. None where no round has scores."""
        panels = [
            metric
            for metric in PLOTTED
            if any(metric in m for r in self.rounds for m in r["means"].values())
        ]
        if not panels:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        names = list(dict.fromkeys(n for r in self.rounds for n in r["means"]))
        for axis, metric in zip(axes[0], panels):
            for name in names:
                rounds, means, lows, highs = [], [], [], []
                for entry in self.rounds:
                    values = [
                        c["methods"][name]["scores"][metric]
                        for c in entry["clients"]
                        if c["status"] == "audited"
                        and name in c["methods"]
                        and (c["methods"][name].get("scores") or {}).get(metric) is not None
                    ]
                    if values:
                        rounds.append(entry["round"])
                        means.append(sum(values) / len(values))
                        lows.append(min(values))
                        highs.append(max(values))
                if not rounds:
                    continue
                (line,) = axis.plot(rounds, means, marker="o", label=name)
                axis.fill_between(rounds, lows, highs, color=line.get_color(), alpha=0.15)
            axis.set_title(metric)
            axis.set_xlabel("round")
            axis.set_ylim(-0.02, 1.02)
            axis.xaxis.get_major_locator().set_params(integer=True)
        axes[0][0].legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(self.plot_path, dpi=100)
        plt.close(figure)
        return self.plot_path


def format_rounds(rounds: list[dict], metric: str = "IRec") -> str:
    """A table: one row per attack with a ``metric`` (presence-only attacks have no IRec), one
    column per round, the mean over the clients audited (``-`` where none had a score); a last
    column with the mean over rounds."""
    names = [
        name
        for name in dict.fromkeys(n for r in rounds for n in r["means"])
        if any(metric in r["means"].get(name, {}) for r in rounds)
    ]
    if not names:
        return ""
    width = max(len(name) for name in names + [metric])
    header = f"{metric:<{width}}  " + "  ".join(f"{'r' + str(r['round']):>6}" for r in rounds)
    header += f"  {'mean':>6}"
    lines = [header]
    for name in names:
        values = [r["means"].get(name, {}).get(metric) for r in rounds]
        cells = [f"{'-':>6}" if v is None else f"{v:6.3f}" for v in values]
        known = [v for v in values if v is not None]
        mean = f"{sum(known) / len(known):6.3f}" if known else f"{'-':>6}"
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {mean}")
    return "\n".join(lines)
