#!/bin/sh
# The bhatti "Snapshots" page (../../shared/seeds/000_*), run against kiln: the page's commands exactly as
# written, with `kiln` for `bhatti`. Needs a running daemon (KILN_SOCKET, or the default socket) and a
# sandbox named dev, made here with the tiny template when there is none.
# crates/kiln-cli/tests/seeds_bhatti.rs runs it and checks what the page says happens.
set -eux

kiln sandbox inspect dev >/dev/null 2>&1 || kiln sandbox create --name dev --template tiny

# Checkpoint before a risky experiment
kiln snapshot create dev --name dev-pre-experiment
kiln snapshot list

# Fork: same VM state, multiple copies
kiln snapshot resume dev-pre-experiment --name copy-1
kiln snapshot resume dev-pre-experiment --name copy-2

# Clean up
kiln snapshot delete dev-pre-experiment -y

# How is this different from stop? stop freezes the sandbox to disk; start resumes that same sandbox.
kiln stop dev
kiln start dev
