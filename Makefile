# mailtresor — developer entry points.  `make run` and `make test` work on a
# fresh Debian 12 as root: they install what is missing first.

PYTHON      := /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
CONFIG      ?= conf/dev.toml
PYTEST_ARGS ?=

# Exactly the Debian packages the .deb depends on, plus the tools the tests
# and benchmarks drive (a real Postfix, swaks, notmuch, openssl ...).
RUNTIME_DEBS := python3-twisted python3-milter python3-xapian python3-lmdb \
	python3-systemd python3-openssl python3-cryptography python3-zstandard \
	python3-ldap3 python3-argon2 python3-service-identity python3-seccomp \
	python3-pyotp python3-bleach python3-html5lib python3-prometheus-client python3-jsonschema python3-jinja2 \
	python3-babel python3-qrcode python3-paramiko xapian-tools
DEV_DEBS := python3-venv python3-pip python3-setuptools python3-pytest \
	postfix swaks openssl notmuch python3-notmuch2 poppler-utils cryptsetup-bin e2fsprogs \
	libsasl2-modules procps iproute2 util-linux \
	systemd build-essential dpkg-dev debhelper dh-python python3-all pybuild-plugin-pyproject \
	lintian slapd ldap-utils chromium chromium-driver python3-selenium zbar-tools \
	openssh-server openssh-client

.PHONY: all deps run test test-fast bench bench-archive clean distclean deb

all: deps

# Installing postfix must neither ask questions nor start the system
# instance: preseed "No configuration" and forbid service starts through
# policy-rc.d for the duration of the install only.
$(VENV)/.deps: Makefile setup.cfg
	@missing=""; for p in $(RUNTIME_DEBS) $(DEV_DEBS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  [ "$$(id -u)" = 0 ] || { echo "make: run as root to install:$$missing" >&2; exit 1; }; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections; \
	  made_policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
	  [ -n "$$made_policy" ] && rm -f /usr/sbin/policy-rc.d; \
	  [ $$rc = 0 ] || exit $$rc; \
	fi
	@[ -x $(VPY) ] || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(VPY) -m pip install -q --no-index --no-build-isolation --no-deps -e . >/dev/null
	@touch $@

# axe-core (accessibility checks in the browser tests), from the npm
# registry into a directory this Makefile owns, checked against the pinned
# integrity hash; never fetched at run time.  No node or npm is needed
# (tests/harness/npmfetch.py says why).
AXE_VERSION := 4.10.3
AXE_INTEGRITY := sha512-Xm7bpRXnDSX2YE2YFfBk2FnF0ep6tmG7xPh8iHee8MIcrgq762Nkce856dYtJYLkuIoYZvGfTs/PbZhideTcEg==
AXE := .cache/npm/node_modules/axe-core/axe.min.js

$(AXE):
	@$(PYTHON) tests/harness/npmfetch.py axe-core $(AXE_VERSION) $(AXE_INTEGRITY) .cache/npm >/dev/null

deps: $(VENV)/.deps $(AXE)

run: deps
	$(VPY) -m tests.harness.devstack --config $(CONFIG)

test: deps
	$(VPY) -m pytest $(PYTEST_ARGS)

# The quick loop while developing: no crash loops, no full-corpus runs.
test-fast: deps
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: deps
	$(VPY) bench/ingest

bench-archive: deps
	$(VPY) bench/archive

clean:
	rm -rf build *.egg-info daemon/*.egg-info .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) run

# The Debian package, built from a copy of the checkout (tracked files plus
# new, not ignored ones) so that the tree stays clean: build/deb/*.deb.
# PATH starts with Debian's own directories: the build must use
# /usr/bin/python3 and its modules, whatever python3 comes first on PATH.
deb: deps
	rm -rf build/deb && mkdir -p build/deb/src
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null --ignore-failed-read -T - -cf - | tar -xf - -C build/deb/src
	cd build/deb/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	lintian build/deb/mailtresor_*.deb
	@ls -l build/deb/*.deb
