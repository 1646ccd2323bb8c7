# Local and CI run the same targets.  Everything lives in .venv; the lock
# file pins every transitive dependency so a fresh machine gets the same set.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/gateway.toml

.PHONY: run test check lint fmt bench soak lock clean
.PHONY: check-deploy system-deps-test system-deps-check system-deps-bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The modules mypyc compiles (pyproject.toml [tool.obs-gateway] compiled):
# editing one rebuilds the in-place build, so the tests run what was edited.
COMPILED := $(shell sed -n '/^compiled = \[/,/^\]/s/^ *"\(.*\)",*$$/\1/p' pyproject.toml)
# A C compiler means the install compiles them: the tests then insist that
# the compiled build is what runs (tests/functional/test_build_functional.py).
EXPECT_BUILD := $(if $(shell command -v cc),compiled,pure)

$(VENV)/.installed: pyproject.toml requirements.lock setup.py $(COMPILED) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test,dev,bench]'
	touch $@

# The Debian programs a target runs (scripts/system-deps.txt): installed first
# when missing and this user may (root or password-less sudo), else the target
# stops here with the apt-get command to run.
system-deps-test system-deps-check system-deps-bench:
	@scripts/ensure-system-deps $(@:system-deps-%=%)

## run: start the gateway with config/gateway.toml (generates a dev token if OBS_INGEST_TOKEN is unset)
run: $(VENV)/.installed
	@if [ -z "$$OBS_INGEST_TOKEN" ]; then \
	  OBS_INGEST_TOKEN=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))'); \
	  export OBS_INGEST_TOKEN; \
	  echo "OBS_INGEST_TOKEN is unset: generated a development token for this run only:"; \
	  echo "  export OBS_INGEST_TOKEN=$$OBS_INGEST_TOKEN"; \
	fi; \
	exec $(BIN)/obs-gateway run --config $(CONFIG)

# The OpenTelemetry JS SDK for the integration tier's node sender, pinned by
# its package-lock.json (needs node >= 18.19 and npm: scripts/system-deps.txt).
NODE_SENDER := tests/integration/node
$(NODE_SENDER)/node_modules/.installed: $(NODE_SENDER)/package.json $(NODE_SENDER)/package-lock.json
	npm ci --prefix $(NODE_SENDER) --no-audit --no-fund --loglevel=error
	touch $@

## test: the whole suite: unit, functional (loopback sockets), hostile (attacks, fuzzing) and integration (real VictoriaMetrics, vmagent, Prometheus, OTel Python and JS SDKs); not the soak.
##       Against the compiled build, then functional and hostile again on the pure-Python modules.
test: system-deps-test $(VENV)/.installed $(NODE_SENDER)/node_modules/.installed
	OBS_GATEWAY_EXPECT_BUILD=$(EXPECT_BUILD) $(BIN)/pytest -m "not soak"
	OBS_GATEWAY_PURE=1 $(BIN)/pytest -m "not soak" tests/functional tests/hostile

## soak: minutes of mixed load on the real CLI with reloads and upstream restarts (SOAK_SECONDS, default 100)
soak: $(VENV)/.installed
	$(BIN)/pytest -m soak -o timeout=300 -s tests/soak

## check: lint, format and type gates
check: system-deps-check $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## check-deploy: lint what ships, without a Docker engine: Dockerfile (hadolint), compose.yml
## (compose schema), alert rules (promtool check + unit tests, vmalert), vmagent scrape config,
## k8s manifests (bundled JSON schemas), and tests/deploy (dashboard/rule metric names against
## a running gateway; the files agree with each other).  System tools: promtool, docker-compose,
## vmalert/vmagent (Debian: prometheus docker-compose victoria-metrics; installed when missing).
check: check-deploy
# Kubernetes releases to validate against: a k3s-era floor and the newest bundled schema.
K8S_VERSIONS ?= 1.30.0 1.37.0
# compose.yml refuses empty secrets; the lint fills them with placeholders and
# reads .env.example (not a developer's real .env) for everything else.
LINT_ENV := OBS_INGEST_TOKEN=lint-placeholder OBS_SELFMON_TOKEN=lint-placeholder \
            GRAFANA_ADMIN_PASSWORD=lint-placeholder

check-deploy: system-deps-check $(VENV)/.installed
	$(BIN)/hadolint Dockerfile
	$(LINT_ENV) docker-compose --env-file .env.example -f compose.yml config -q
	promtool check rules deploy/alerts/obs-gateway.rules.yml
	promtool test rules deploy/alerts/obs-gateway.rules.test.yml
	vmalert -dryRun -loggerLevel=ERROR -rule=deploy/alerts/obs-gateway.rules.yml
	vmagent -dryRun -loggerLevel=ERROR -promscrape.config=deploy/vmagent/scrape.yml
	for v in $(K8S_VERSIONS); do \
	  $(BIN)/kubernetes-validate --strict --quiet -k $$v deploy/k8s/*.yaml || exit 1; \
	done
	$(BIN)/pytest -q tests/deploy

fmt: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: nginx (seed, tuned) / vmauth / direct vs the gateway (~8 min on 2 cores; bench/README.md).
##        QUICK=1: gateway vs tuned nginx at 1 KiB, one run; BENCH_ARGS="--only gateway --sizes 1m ..."
bench: system-deps-bench $(VENV)/.installed
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(BENCH_ARGS)

## bench-profile: py-spy (and perf, if installed) profile of the gateway under 1 KiB load
.PHONY: bench-profile
bench-profile: system-deps-bench $(VENV)/.installed
	$(BIN)/python -m bench profile $(PROFILE_ARGS)

## lock: re-pin every dependency (needs network)
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra test --extra dev --extra bench --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml -c requirements.lock --generate-hashes --python-version 3.11 -o requirements-runtime.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
