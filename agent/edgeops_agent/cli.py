"""The ``edgeops-agent`` command (device side).

::

    edgeops-agent verify BUNDLE --key PUB.pem            offline check, as install does
    edgeops-agent trust add KEY.pem --data-dir D          add a development key (no root of trust)
    edgeops-agent trust root ROOT.json --data-dir D [--release-keys LIST.json]   provision the root
    edgeops-agent trust update --data-dir D [--root R.json ...] [--release-keys LIST.json]
    edgeops-agent trust show --data-dir D [--json]
    edgeops-agent install BUNDLE --data-dir D [--target T] [--json]
    edgeops-agent status --data-dir D [--json]
    edgeops-agent predict --data-dir D [FEATURES_JSON]    one JSON array, or JSON lines on stdin
    edgeops-agent run --config agent.toml                 the daemon (MQTT, socket, telemetry)

Exit codes: 0 success; 1 internal error; 2 bad input (usage, config, key, tensor);
3 install refused (wrong target, not newer, self-test failed); 4 bundle rejected
(tampered, untrusted, expired, malformed); 5 the agent cannot work (damaged state,
runtime missing). Every error is one line on stderr starting with ``error:``.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgeops_agent import __version__
from edgeops_core import BundleError, EdgeopsError, InputError, load_public_key, verify_bundle

__all__ = ["main"]

EXIT_INTERNAL, EXIT_INPUT, EXIT_REFUSED, EXIT_BUNDLE, EXIT_AGENT = 1, 2, 3, 4, 5


def _code(exc: EdgeopsError) -> int:
    from edgeops_agent.errors import InstallRejectedError

    if isinstance(exc, InputError):
        return EXIT_INPUT
    if isinstance(exc, BundleError):
        return EXIT_BUNDLE
    if isinstance(exc, InstallRejectedError):
        return EXIT_REFUSED
    return EXIT_AGENT


def _run(as_json: bool, body: Callable[[], None]) -> None:
    try:
        body()
    except EdgeopsError as exc:
        if as_json:
            click.echo(
                json.dumps({"ok": False, "exit_code": _code(exc), "error": {"type": type(exc).__name__, "message": str(exc)}})
            )
        click.echo(f"error: {exc}", err=True)
        sys.exit(_code(exc))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback, for anything unexpected
        if "--debug" in sys.argv:
            traceback.print_exception(exc)
        click.echo(f"error: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)


def _bundle_path(path: Path) -> Path:
    """``path`` if something is there; a missing bundle is the caller's input error (exit 2), not a rejected bundle."""
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such bundle file")
    return path


_data_dir = click.option(
    "--data-dir", "-d", required=True, type=click.Path(path_type=Path, file_okay=False), help="The agent's data directory."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops-agent")
def main() -> None:
    """edgeops-agent: verify, install and run edgeops bundles on a device."""


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "-k",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable.",
)
def verify(bundle: Path, keys: tuple[Path, ...]) -> None:
    """Check BUNDLE's signature, digests, members, manifest and expiry, offline."""

    def body() -> None:
        trusted = [load_public_key(k) for k in keys]
        m = verify_bundle(_bundle_path(bundle), trusted).manifest
        click.echo(f"OK {m.name} {m.version} release {m.release} for {m.target}")

    _run(False, body)


@main.group()
def trust() -> None:
    """Manage the trust store: a root of trust and its release keys, or development keys."""


@trust.command("add")
@click.argument("key", type=click.Path(path_type=Path, dir_okay=False))
@_data_dir
def trust_add(key: Path, data_dir: Path) -> None:
    """Trust KEY (an ECDSA public key, PEM) for bundle signatures: a single-key development setup.

    Refused on a device with a root of trust (its release-key list decides which keys sign).
    """
    from edgeops_agent.store import DataDir
    from edgeops_agent.trust import TrustStore

    def body() -> None:
        trusted = TrustStore(DataDir(data_dir)).add_development_key(key)
        click.echo(f"trusted key sha256:{trusted.fingerprint[:16]}… ({key})")

    _run(False, body)


def _trust_line(update: Any) -> str:
    detail = update.detail()
    revoked = f", revoked {', '.join(k[:16] + '…' for k in detail['revoked'])}" if detail["revoked"] else ""
    what = "updated" if update.changed else "unchanged (the same documents are trusted already)"
    if update.warning is not None:
        click.echo(f"warning: {update.warning}", err=True)
    return f"trust {what}: root version {detail['root_version']}, release-key list version {detail['keys_version']}{revoked}"


@trust.command("root")
@click.argument("root", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--release-keys", type=click.Path(path_type=Path, dir_okay=False), help="The first release-key list.")
@_data_dir
def trust_root(root: Path, release_keys: Path | None, data_dir: Path) -> None:
    """Provision ROOT (root.json from `edgeops keys root init`) as this device's root of trust.

    Trust on first use: whoever sets the device up vouches for ROOT. Afterwards a root is
    replaced only by a trust_update signed by the current one; bundles verify only against
    the release keys a root-signed list names.
    """
    from edgeops_agent.store import DataDir
    from edgeops_agent.trust import TrustStore, read_document

    def body() -> None:
        doc = read_document(root, what="root")
        listed = read_document(release_keys, what="release-key list") if release_keys is not None else None
        click.echo(_trust_line(TrustStore(DataDir(data_dir)).provision(doc, listed)))

    _run(False, body)


@trust.command("update")
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A newer root, oldest first. Repeatable.",
)
@click.option("--release-keys", type=click.Path(path_type=Path, dir_okay=False), help="A newer release-key list.")
@_data_dir
def trust_update(roots: tuple[Path, ...], release_keys: Path | None, data_dir: Path) -> None:
    """Apply root rotations and/or a release-key list from files, as a trust_update command does."""
    from edgeops_agent.store import DataDir
    from edgeops_agent.trust import TrustStore, read_document
    from edgeops_core.trust import trust_update_args

    def body() -> None:
        args: dict[str, Any] = {"root": [read_document(r, what="root") for r in roots]}
        if release_keys is not None:
            args["release_keys"] = read_document(release_keys, what="release-key list")
        click.echo(_trust_line(TrustStore(DataDir(data_dir)).update(*trust_update_args(args))))

    _run(False, body)


@trust.command("show")
@_data_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def trust_show(data_dir: Path, as_json: bool) -> None:
    """Show the root of trust, the release keys and the revoked keys (or the development keys)."""
    from edgeops_agent.store import DataDir
    from edgeops_agent.trust import TrustStore

    def body() -> None:
        s = TrustStore(DataDir(data_dir)).summary()
        if as_json:
            click.echo(json.dumps({"ok": True, **s.to_dict()}))
            return
        if s.root_version is None:
            click.echo(f"no root of trust: development keys ({len(s.development_keys)})")
            for k in s.development_keys:
                click.echo(f"  {k}")
            return
        click.echo(f"root:     version {s.root_version}, expires {s.root_expires}, {s.threshold} of {len(s.root_keys)} keys")
        for k in s.root_keys:
            click.echo(f"  {k}")
        if s.keys_version is None:
            click.echo("release keys: no list yet (send a trust_update)")
        else:
            click.echo(f"release keys: list version {s.keys_version}, expires {s.keys_expires}, {len(s.release_keys)} trusted")
            for k in s.release_keys:
                click.echo(f"  {k}")
        click.echo(f"revoked:  {len(s.revoked)}")
        for k in s.revoked:
            click.echo(f"  {k}")

    _run(as_json, body)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_data_dir
@click.option("--target", "-t", default=None, help="This device's target (recorded on first use).")
@click.option("--switch-model", default=None, metavar="NAME", help="Allow installing model NAME over another model (ADR 0009).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def install(bundle: Path, data_dir: Path, target: str | None, switch_model: str | None, as_json: bool) -> None:
    """Verify BUNDLE, stage it in the inactive slot, self-test it, and make it active."""
    from edgeops_agent.install import install_bundle
    from edgeops_agent.store import DataDir

    def body() -> None:
        # Not through Agent: installing must not need the active slot to load (it may be the repair).
        result = install_bundle(DataDir(data_dir), _bundle_path(bundle), target=target, switch_model=switch_model)
        info = {
            "ok": True,
            "name": result.name,
            "version": result.version,
            "release": result.release,
            "previous_release": result.previous_release,
            "slot": result.slot,
            "self_tests": result.self_tests,
        }
        if as_json:
            click.echo(json.dumps(info))
        else:
            click.echo(
                f"installed {result.name} {result.version} release {result.release} in slot {result.slot} "
                f"({result.self_tests} self-test vectors passed); it is now active"
            )

    _run(as_json, body)


@main.command()
@_data_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(data_dir: Path, as_json: bool) -> None:
    """Show the active bundle, both slots, the anti-rollback floor and the last error."""
    from edgeops_agent.store import DataDir
    from edgeops_agent.trust import TrustStore

    def body() -> None:
        data = DataDir(data_dir)
        state = data.load_state()
        try:
            trust, trust_error = TrustStore(data).summary(), None
        except EdgeopsError as exc:  # a damaged trust store must not hide the rest of the status
            trust, trust_error = None, str(exc)
        keys = () if trust is None else trust.release_keys if trust.root_version is not None else trust.development_keys
        root_version = trust.root_version if trust is not None else None
        doc = {
            "ok": True,
            **state.to_dict(),
            "trusted_keys": list(keys),
            "root_version": root_version,
            "trust_error": trust_error,
        }
        if as_json:
            click.echo(json.dumps(doc))
            return
        active = state.slots.get(state.active) if state.active else None
        click.echo(f"target:   {state.target or '(not set)'}")
        if active:
            click.echo(
                f"active:   slot {state.active}: {active.name} {active.version} release {active.release} ({active.runtime})"
            )
        else:
            click.echo("active:   none (install a bundle)")
        for slot, info in sorted(state.slots.items()):
            text = (
                f"{info.name} release {info.release}, sha256 {info.sha256[:16]}…, installed {info.installed}" if info else "empty"
            )
            click.echo(f"slot {slot}:   {text}")
        floor = ", ".join(f"{k} {v}" for k, v in sorted(state.highest_release.items())) or "none"
        click.echo(f"highest:  {floor}")
        if trust is None:
            click.echo(f"trusted:  error: {trust_error}")
        else:
            root = f" (root version {root_version}, release-key list version {trust.keys_version})" if root_version else ""
            click.echo(f"trusted:  {len(keys)} key(s){root}")
        click.echo(f"last error: {state.last_error or 'none'}")

    _run(as_json, body)


@main.command()
@_data_dir
@click.argument("features", required=False)
def predict(data_dir: Path, features: str | None) -> None:
    """Predict with the active model: FEATURES is one JSON array; without it, JSON arrays are read from stdin, one per line.

    An N-d input is a nested array of the model's sample shape (or with a leading 1).

    Prints one JSON object per input; a bad line prints {"ok": false, "error": ...} and the
    rest go on (the exit code is then 2).
    """
    from edgeops_agent.agent import Agent
    from edgeops_agent.server import json_tensor
    from edgeops_agent.store import DataDir

    def body() -> None:
        agent = Agent(DataDir(data_dir))
        # Bytes, decoded per line: a line that is not UTF-8 is one bad line, not the end.
        lines = [features.encode()] if features is not None else (line for line in sys.stdin.buffer if line.strip())
        bad = 0
        for line in lines:
            try:
                try:
                    values: Any = json.loads(line.decode("utf-8"))
                except RecursionError:
                    raise InputError("the JSON is nested too deeply") from None
                except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
                    raise InputError(f"not UTF-8 JSON: {str(exc)[:200]}") from None
                if not isinstance(values, list):
                    raise InputError(f"expected a JSON array of numbers, got {type(values).__name__}")
                row = json_tensor(values)
                if row is None:
                    raise InputError("expected a JSON array (nested for an N-d input) of numbers that fit a float32")
                out = {"ok": True, **agent.predict(row).to_dict()}
            except EdgeopsError as exc:
                if not isinstance(exc, InputError):
                    raise  # no model, a runtime failure: the agent cannot answer any line
                bad += 1
                out = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
            click.echo(json.dumps(out))
        if bad:
            sys.exit(EXIT_INPUT)

    _run(False, body)


@main.command()
@click.option("--config", "-c", "config_path", required=True, type=click.Path(path_type=Path), help="agent.toml")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), show_default=True)
def run(config_path: Path, log_level: str) -> None:
    """Run the agent daemon: MQTT state/telemetry/events, the local socket, drift detection."""
    from edgeops_agent.config import load_config
    from edgeops_agent.daemon import Daemon

    def body() -> None:
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack to stderr
        # A fatal signal (SIGABRT: systemd's watchdog kill) dumps every thread's stack first,
        # so the journal shows where the serving path was stuck.
        faulthandler.enable()
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        daemon = Daemon(load_config(config_path))
        click.echo(f"edgeops-agent {__version__}: device {daemon.config.device_id}, socket {daemon.server.path}", err=True)
        daemon.run()

    _run(False, body)
