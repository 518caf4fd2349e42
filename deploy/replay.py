#!/usr/bin/env python3
"""Runs deploy/Dockerfile's runtime stage without a Docker engine, as Docker would.

Where no Docker engine runs (this project's build machines have only the client), this
replays the final stage of the Dockerfile into a Debian root filesystem made by
debootstrap (the same release as the stage's `FROM`), then runs the image the way
docs/DEPLOYING.md tells owners to:

- RUN as root in the root filesystem, COPY from the repository (and `--from=builder`
  from a release binary built on this machine: a Debian bookworm host, like the builder),
  ENV, WORKDIR, USER, VOLUME, HEALTHCHECK, ENTRYPOINT, CMD and STOPSIGNAL as written;
- the container: a network namespace of its own (loopback only), the root filesystem
  bind-mounted read-only (`docker run --read-only`), a tmpfs on /tmp, the VOLUME a fresh
  directory owned as the image's directory is (as Docker fills a new named volume), and
  the process started as the image's USER with the image's ENV only;
- then the checks: the HEALTHCHECK command passes inside the container; the process
  runs as the USER's uid; a query through Flight SQL answers; nothing was written
  outside the volume; the STOPSIGNAL stops it with exit status 0.

Two runs: `airlock demo` on an empty volume, then `airlock serve` (the image's CMD) with
a configuration mounted read-only under /etc/airlock whose datasets point under /data,
a read-only mount of the files the demo wrote.

Needs root, iproute2, util-linux and debootstrap (`apt-get install debootstrap`), and
a release binary (`cargo build --release --bin airlock`). Not part of the test suite:
it downloads a Debian base system (about 100 MB) the first time.

    python3 deploy/replay.py [--rootfs DIR] [--binary PATH | --build]

With --build, the builder stage is replayed too: its COPY lines into a fresh directory
and its `cargo build` there with the Rust release its FROM names (installed with
rustup), so the image's context and lock file are checked as well (a full release
build: about 40 minutes on two cores).
"""

import argparse
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NS = "airlock-replay"


def log(msg):
    print(f"[replay] {msg}", flush=True)


def stages(dockerfile: Path):
    """Every stage: (FROM's argument, [(KEYWORD, rest)]), continuation lines joined."""
    lines, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    found, stage = [], []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = []
            found.append((rest.strip(), stage))
        elif found:
            stage.append((word.upper(), rest.strip()))
    return found


def copy(origin: Path, target: Path):
    """COPY of one file or directory (a directory's contents merge into `target`)."""
    if origin.is_dir():
        shutil.copytree(origin, target, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


class Image:
    def __init__(self, rootfs: Path, binary: Path):
        self.root = rootfs
        self.binary = binary
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.workdir = "/"
        self.user = "root"
        self.volumes = []
        self.healthcheck = None
        self.entrypoint = []
        self.cmd = []
        self.stopsignal = "SIGTERM"

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def apply(self, word, rest):
        if word == "RUN":
            log(f"RUN {rest[:70]}...")
            sh(["chroot", str(self.root), "/usr/bin/env", "-i",
                *[f"{k}={v}" for k, v in self.env.items()], "/bin/sh", "-c", rest])
        elif word == "COPY":
            args = shlex.split(rest)
            builder = any(a.startswith("--from=") for a in args)
            args = [a for a in args if not a.startswith("--")]
            *srcs, dst = args
            for src in srcs:
                origin = self.binary if builder else REPO / src
                if builder and src != "/usr/local/bin/airlock":
                    raise SystemExit(f"COPY --from=builder {src}: only the binary is known here")
                target = self.path(dst)
                log(f"COPY {'(builder) ' if builder else ''}{src} -> {dst}")
                copy(origin, target)
        elif word == "ENV":
            for pair in shlex.split(rest):
                k, _, v = pair.partition("=")
                self.env[k] = v
        elif word == "WORKDIR":
            self.workdir = rest
            self.path(rest).mkdir(parents=True, exist_ok=True)
        elif word == "USER":
            self.user = rest
        elif word == "VOLUME":
            self.volumes += json.loads(rest)
        elif word == "HEALTHCHECK":
            opts, _, cmd = rest.partition("CMD")
            self.healthcheck = (opts.split(), json.loads(cmd.strip()))
        elif word == "ENTRYPOINT":
            self.entrypoint = json.loads(rest)
        elif word == "CMD":
            self.cmd = json.loads(rest)
        elif word == "STOPSIGNAL":
            self.stopsignal = rest
        elif word in ("EXPOSE", "LABEL", "ARG"):
            pass
        else:
            raise SystemExit(f"instruction not replayed: {word} {rest}")

    def ids(self):
        """The USER's uid and gid, from the image's own /etc/passwd and /etc/group."""
        user, _, group = self.user.partition(":")

        def lookup(file, name):
            for line in self.path(file).read_text().splitlines():
                f = line.split(":")
                if f[0] == name or f[2] == name:
                    return int(f[2]) if file == "/etc/group" else (int(f[2]), int(f[3]))
            raise SystemExit(f"USER {self.user}: {name} is not in the image's {file}")

        uid, gid = lookup("/etc/passwd", user)
        if group:
            gid = lookup("/etc/group", group)
        return uid, gid


class Container:
    """One `docker run --read-only --tmpfs /tmp -v VOL:VOLUME [mounts] image args`."""

    def __init__(self, image: Image, args, mounts=(), name="run"):
        self.image, self.args, self.mounts = image, args, list(mounts)
        self.dir = Path(tempfile.mkdtemp(prefix=f"airlock-replay-{name}-"))
        self.volume = self.dir / "volume"
        self.volume.mkdir()
        st = image.path(image.volumes[0]).stat()
        os.chown(self.volume, st.st_uid, st.st_gid)
        os.chmod(self.volume, st.st_mode & 0o7777)
        self.proc = None

    def start(self):
        img, root = self.image, self.image.root
        uid, gid = img.ids()
        mounts = [f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}",
                  f"mount --rbind /dev {root}/dev", f"mount -t proc proc {root}/proc",
                  f"mount -t tmpfs tmpfs {root}/tmp",
                  f"mount --bind {self.volume} {img.path(img.volumes[0])}"]
        for src, dst in self.mounts:
            mounts.append(f"mount --bind {src} {img.path(dst)}")
            mounts.append(f"mount -o remount,bind,ro {img.path(dst)}")
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in img.env.items())
        argv = " ".join(shlex.quote(a) for a in img.entrypoint + self.args)
        inner = f"cd {shlex.quote(img.workdir)} && exec /usr/bin/env -i {env} {argv}"
        script = " && ".join(mounts) + (
            f" && exec chroot --userspec={uid}:{gid} {root} /bin/sh -c {shlex.quote(inner)}")
        self.out = open(self.dir / "out", "w")
        log(f"docker run --read-only ... {' '.join(img.entrypoint + self.args)}")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, "unshare", "--mount", "--propagation", "private",
             "--", "/bin/sh", "-c", script],
            stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.airlock_pid()

    def airlock_pid(self):
        """The container's main process (the shell execs into chroot, then airlock)."""
        for _ in range(100):
            if self.proc.poll() is not None:
                raise SystemExit(f"the container exited: {self.log()}")
            exe = Path(f"/proc/{self.proc.pid}/exe")
            try:
                if os.readlink(exe).endswith("/usr/local/bin/airlock"):
                    return self.proc.pid
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"airlock did not start: {self.log()}")

    def log(self):
        return (self.dir / "out").read_text()

    def exec(self, argv, timeout=30):
        """`docker exec` as the image's USER (the HEALTHCHECK runs so)."""
        uid, gid = self.image.ids()
        env = [f"{k}={v}" for k, v in self.image.env.items()]
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-n", "chroot", f"--userspec={uid}:{gid}",
             str(self.image.root), "/usr/bin/env", "-i", *env, *argv],
            capture_output=True, text=True, timeout=timeout)

    def healthy(self, within=120.0):
        opts, cmd = self.image.healthcheck
        deadline = time.time() + within
        while time.time() < deadline:
            r = self.exec(cmd)
            if r.returncode == 0:
                return True
            if self.proc.poll() is not None:
                raise SystemExit(f"the container exited: {self.log()}")
            time.sleep(1)
        raise SystemExit(f"HEALTHCHECK {cmd} never passed ({opts}); log:\n{self.log()}")

    def uid(self):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])

    def stop(self):
        sig = getattr(signal, self.image.stopsignal)
        os.kill(self.pid, sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise SystemExit(f"{self.image.stopsignal} did not stop the container")
        self.out.close()
        return code


def query(container, user, password, sql):
    """A Flight SQL query from the host's client, in the container's network."""
    r = subprocess.run(
        ["ip", "netns", "exec", NS, str(container.image.binary), "sql",
         "--url", "grpc://127.0.0.1:50051", "--user", user, "--password", password, sql],
        capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"query failed: {r.stderr}\nserver log:\n{container.log()}")
    return r.stdout


def build(stage, base_image):
    """The builder stage: its COPY lines into a fresh directory, then its cargo command
    there, with the Rust release its FROM names (a rustup toolchain, not the image)."""
    version = re.match(r"rust:(\d+\.\d+)", base_image)
    if not version:
        raise SystemExit(f"builder FROM {base_image}: not a rust image")
    toolchain = version.group(1)
    sh(["rustup", "toolchain", "install", toolchain, "--profile", "minimal"])
    src = Path(tempfile.mkdtemp(prefix="airlock-replay-build-"))
    cargo = None
    for word, rest in stage:
        if word == "COPY":
            *items, dst = shlex.split(rest)
            for item in items:
                origin = REPO / item
                target = src / dst / (origin.name if dst.endswith("/") else "")
                log(f"COPY (builder) {item} -> {dst}")
                copy(origin, target)
        elif word == "RUN":
            m = re.search(r"(cargo build [^&;]*)", rest)
            if m:
                cargo = shlex.split(m.group(1))
    if cargo is None:
        raise SystemExit("the builder stage runs no `cargo build`")
    log(f"RUN (builder, Rust {toolchain}) {' '.join(cargo)} in {src}")
    env = dict(os.environ, CARGO_TARGET_DIR=str(src / "target"))
    sh(["cargo", f"+{toolchain}", *cargo[1:]], cwd=src, env=env)
    return src / "target" / "release" / "airlock"


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    log(f"ok: {what}")


def snapshot(root: Path):
    """Every path of the root filesystem with its size and mtime (mounts excluded)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("proc", "dev", "tmp", "sys"):
            dirnames[:] = []
            continue
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
                seen[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
    return seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rootfs", default="/var/tmp/airlock-replay-bookworm",
                    help="the debootstrap base (made once, then copied per replay)")
    ap.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", REPO / "target"), "release", "airlock"))
    ap.add_argument("--build", action="store_true",
                    help="replay the builder stage too (a full release build: long)")
    args = ap.parse_args()
    binary = Path(args.binary)
    if not args.build and not binary.is_file():
        raise SystemExit(f"no release binary at {binary}: cargo build --release --bin airlock")

    found = stages(REPO / "deploy" / "Dockerfile")
    base_image, stage = found[-1]
    if args.build:
        binary = build(found[0][1], found[0][0])
        check(binary.is_file(), f"the builder stage built {binary}")
    check(re.fullmatch(r"debian:bookworm(-slim)?", base_image) is not None,
          f"the runtime stage starts FROM {base_image} (replayed on debootstrap bookworm)")
    base = Path(args.rootfs)
    if not (base / "etc" / "debian_version").exists():
        log(f"debootstrap --variant=minbase bookworm {base}")
        sh(["debootstrap", "--variant=minbase", "bookworm", str(base),
            "http://deb.debian.org/debian"], stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="airlock-replay-"))
    root = work / "rootfs"
    sh(["cp", "-a", str(base), str(root)])
    image = Image(root, binary)
    for word, rest in stage:
        image.apply(word, rest)
    check(image.user not in ("root", "0", "0:0"), f"USER {image.user} is not root")
    check(image.healthcheck is not None, "the image has a HEALTHCHECK")
    check(bool(image.volumes), f"VOLUME {image.volumes}")

    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)
    sh(["ip", "netns", "add", NS])
    sh(["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"])
    try:
        # 1. The demo on an empty volume.
        before = snapshot(root)
        demo = Container(image, ["demo"], name="demo")
        demo.start()
        check(demo.healthy(), "HEALTHCHECK passes (demo)")
        check(demo.uid() == image.ids()[0], f"the process runs as uid {image.ids()[0]}")
        out = query(demo, "analyst", "analyst",
                    "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward")
        check("ward" in out, "a Flight SQL query answers (demo)")
        check(snapshot(root) == before, "nothing written outside the volume and /tmp")
        r = demo.exec(["/bin/sh", "-c", "touch /etc/airlock/x || touch /x"])
        check(r.returncode != 0 and "Read-only" in r.stderr,
              "the root filesystem is read-only in the container")
        check(demo.stop() == 0, f"{image.stopsignal} stops the demo with status 0")
        data = demo.volume / "demo" / "data"
        check((data / "hospital" / "patients.parquet").is_file(),
              "the demo's files are on the volume")

        # 2. The image's CMD (serve) with an owner's configuration and data mounted.
        conf = work / "conf"
        shutil.copytree(REPO / "conf", conf)
        text = (conf / "airlock.toml").read_text()
        text = text.replace("../state/demo/data/", "/data/")
        (conf / "airlock.toml").write_text(text)
        shutil.copytree(REPO / "policies", conf / "policies", dirs_exist_ok=True)
        image.path("/data").mkdir(exist_ok=True)
        os.chmod(data, 0o755)
        for d in data.rglob("*"):
            os.chmod(d, 0o755 if d.is_dir() else 0o644)
        serve = Container(image, image.cmd, mounts=[(conf, "/etc/airlock"), (data, "/data")],
                          name="serve")
        serve.start()
        check(serve.healthy(), "HEALTHCHECK passes (serve, the image's CMD)")
        out = query(serve, "analyst", "analyst",
                    "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward")
        check("ward" in out, "a Flight SQL query answers (serve)")
        check((serve.volume / "audit").is_dir(), "the audit trail is on the volume")
        check(serve.stop() == 0, f"{image.stopsignal} stops serve with status 0")
        log("the runtime stage replays and runs as documented")
    finally:
        subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, namespaces, chroot)")
    main()
