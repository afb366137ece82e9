# chatd: a durable MQTT chat server. `make run` starts it, `make test` tests it.
GO ?= go

.PHONY: run web test test-js build deb image bench test-deps vet lint

## run: start the server with the embedded defaults (data in ./data, MQTT on 127.0.0.1:1883, HTTP on 127.0.0.1:8080)
## in development mode: the chat page at http://127.0.0.1:8080/ (built first when npm is present), sign-in as any user
run:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory web || echo "the chat page did not build: serving without it (see above)"; \
	else \
		echo "npm missing: the chat page needs Node.js 20 or later and npm to build (apt-get install nodejs npm, then make web); serving without it"; \
	fi
	$(GO) run ./cmd/chatd serve --dev

## web: build the chat page and dashboard into web/dist (Node.js 20+, npm)
web:
	cd web && { [ node_modules -nt package-lock.json ] || npm ci --no-audit --no-fund; } && npm run build

## test: vet, lint and run every test (real broker, real clients, real Badger, a real killed process)
# The packaging tests build and compress whole binaries, which the race
# detector only slows (a 40 MB gzip): they run without it.
PACKAGING := ./cmd/chatd-deb ./cmd/chatd-image

test: test-deps vet lint
	$(GO) test -race -timeout 9m $$($(GO) list ./... | grep -v -e /cmd/chatd-deb$$ -e /cmd/chatd-image$$)
	$(GO) test -timeout 8m -run 'SIGKILL|RollingRestart' ./broker/
	$(GO) test -timeout 5m $(PACKAGING)
	$(MAKE) test-js

## test-js: the TypeScript SDK's tests, and the chat page's and dashboard's in headless Chromium, against a chatd built from this tree
test-js:
	cd sdk/js && npm ci --no-audit --no-fund && npm test
	cd web && npm ci --no-audit --no-fund && npm test

## build: build chatd and loadtest into ./bin
build:
	$(GO) build -o bin/ ./cmd/...

## deb: build the Debian package bin/chatd_<version>_<arch>.deb (nfpm, no Debian tooling needed):
## /usr/bin/chatd, the systemd unit, /etc/chatd/chatd.yaml, the user chatd (docs/operations.md)
deb:
	$(GO) build -trimpath -o bin/chatd ./cmd/chatd
	$(GO) run ./cmd/chatd-deb --binary bin/chatd --out bin/

## image: build the container image bin/chatd-image.tar from a static chatd, no base image pulled
## (go-containerregistry): docker load -i bin/chatd-image.tar gives chatd:latest (deploy/compose)
image:
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/chatd-static ./cmd/chatd
	$(GO) run ./cmd/chatd-image --binary bin/chatd-static --out bin/chatd-image.tar

## bench: our server vs Mosquitto under the same load; writes docs/benchmarks.md
bench:
	bash loadtest/bench.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l .)" || (echo "gofmt needed on:"; gofmt -l .; exit 1)

## lint: staticcheck with its default checks, pinned in go.mod as a tool
## (`go tool staticcheck`); a finding that is intended carries a
## //lint:ignore comment that says why.
lint:
	$(GO) tool staticcheck ./...

# The interoperability test drives the server with Debian's stock
# mosquitto clients, the TypeScript SDK's tests need Node.js and npm, and
# the chat page's tests Chromium, the alert rules' test promtool (Debian's
# prometheus package), the image test a container engine (podman, when no
# docker daemon runs); install them when missing and we are allowed to.
test-deps:
	@command -v npm >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing nodejs and npm for the TypeScript SDK's tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
		else \
			echo "npm missing: install Node.js 20 or later (apt-get install nodejs npm)"; exit 1; \
		fi; }
	@command -v $${CHROMIUM:-/usr/bin/chromium} >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium for the chat page's browser tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium missing: install it for the browser tests (apt-get install chromium), or set CHROMIUM to its path"; exit 1; \
		fi; }
	@command -v promtool >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing prometheus for promtool, which checks deploy/prometheus/alerts.yml (its server is left stopped)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
			if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi; \
		else \
			echo "promtool missing: install it to check the alert rules (apt-get install prometheus)"; exit 1; \
		fi; }
	@command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || command -v podman >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing podman and runc, to start the container image in its test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc) >/dev/null || \
				echo "could not install podman: the image test checks the image as files only"; \
		else \
			echo "no container engine: the image test checks the image as files only (apt-get install podman runc)"; \
		fi; }
	@command -v mosquitto_pub >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing mosquitto-clients for the interoperability test"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients) >/dev/null || \
				echo "could not install mosquitto-clients: the interoperability test will skip"; \
		else \
			echo "mosquitto-clients missing: the interoperability test will skip (apt-get install mosquitto-clients)"; \
		fi; }
