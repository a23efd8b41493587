# spendflow: the test command and the native services.
#
#   make test            install the suite's missing Debian packages (headless Chromium for the
#                        browser test) and grpcurl (the TLS test), start Kafka, Cassandra, MariaDB and HDFS
#                        (docker/native/services), run the whole test suite against them (every
#                        test binary, also after a failure), stop them again (also on failure
#                        or Ctrl-C). CI runs this through .ci/run.
#   make services-up     start the services and leave them running (then:
#                        eval "$$(docker/native/services env)"; cargo test ...)
#   make services-down   stop them
#   make services-status healthy/down per service
#   make tools           install grpcurl and ghz into target/tools/bin
#   make bench-e2e       end-to-end benchmark with the Spark and Kafka Streams baselines and the
#                        scaling table (about 45 min; it prints an estimate): starts Kafka and
#                        Cassandra (left running), writes bench/RESULTS.md; ARGS=--quick,
#                        ARGS="--no-kstreams --no-scaling" for shorter runs
#
# Everything the suite runs is listed once, in TEST_COMMANDS below.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

SERVICES := docker/native/services
CARGO ?= cargo

# The whole suite, in one place. Add new steps here (one shell command per line, `;`-joined).
# --no-fail-fast: a failing test binary does not hide the ones after it. Both steps run even if
# the first fails; the target fails if either did.
define TEST_COMMANDS
status=0; \
$(CARGO) test --workspace --all-targets --no-fail-fast || status=$$?; \
$(CARGO) test --workspace --doc --no-fail-fast || status=$$?; \
$(CARGO) run -q -p spendflow-examples --example embed || status=$$?; \
$(CARGO) run -q -p spendflow-examples --example custom_sink || status=$$?; \
exit $$status
endef

.PHONY: help test services-up services-down services-status tools bench-e2e

help:
	@sed -n '3,16p' Makefile | sed -e 's/^# \{0,1\}//' -e 's/\$$\$$/$$/g'

# The EXIT trap stops the services whatever happens; INT/TERM turn Ctrl-C into a normal exit
# (so the EXIT trap runs once cargo has stopped).
test:
	@$(SERVICES) packages
	@$(SERVICES) tools
	@trap '$(SERVICES) down' EXIT; \
	trap 'exit 130' INT TERM; \
	$(SERVICES) up; \
	eval "$$($(SERVICES) env)"; \
	$(SERVICES) env; \
	$(TEST_COMMANDS)

services-up:
	@$(SERVICES) up
	@echo 'now run: eval "$$($(SERVICES) env)"'

services-down:
	@$(SERVICES) down

services-status:
	@$(SERVICES) status

tools:
	@$(SERVICES) tools

# The harness (bench/src/bin/e2e) installs the Spark baseline itself on first use, into
# target/bench/spark, and builds the Kafka Streams baseline with Maven into target/bench/kstreams.
# The services stay up afterwards, as other work may be using them.
bench-e2e:
	@$(SERVICES) up kafka cassandra; \
	eval "$$($(SERVICES) env)"; \
	$(CARGO) build --release -p spendflow-engine --bin spendflow; \
	$(CARGO) run --release -p spendflow-bench --bin e2e -- $(ARGS)
