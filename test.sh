#!/usr/bin/env bash
# test.sh: THE test command of esro-emsdp. CI (.ci/run) runs exactly this.
#
#   ./test.sh                          vet and test every package
#   ./test.sh -run TestQueue ./server  go test flags and packages pass through
#                                      (packages: ".", "./dir", "./dir/...";
#                                      relative to the repo root; default ./...
#                                      and the bench module's ./...; write flag
#                                      values as -flag=value)
#
# What it does:
#  1. Checks every third-party program the tests run (the PREREQS table below).
#  2. Installs what is missing where it can: apt-get as root, else sudo apt-get
#     (sudo -n when CI=true or stdin is not a terminal, so it never hangs on a
#     password prompt). It says what it installs first, and runs apt-get update
#     first. Where it cannot (not Debian/Ubuntu, no root and no usable sudo, or
#     EMSDP_TEST_NO_INSTALL=1), it prints exactly what to install and how, and
#     stops before running any test.
#  3. gofmt -l over the tree, then go vet on the packages, then go test with
#     the arguments; the same for the bench module (bench/go.mod).
#
# Adding a program the tests need = one line in PREREQS:
#     <command>   <Debian package>   <why: which tests use it>
#   <command> is looked up in PATH, then /usr/sbin and /sbin; it may also be
#   an absolute path glob, and "a|b" accepts either (first found wins).
#   Several lines may name the same package. In the Go test itself, fail
#   (never skip) when the program is missing, naming the Debian package, so
#   `go test ./...` alone stays loud (see internal/pgtest's ErrNoPostgres).
#
# Environment:
#   EMSDP_TEST_NO_INSTALL=1                  check and explain, never install
#   EMSDP_TEST_PRETEND_MISSING="pkg ..."     act as if these Debian packages were
#                                            absent at the first check (to see
#                                            what a fresh machine gets; as root
#                                            it then really runs apt-get install,
#                                            which may upgrade them)
set -euo pipefail

PREREQS='
initdb|/usr/lib/postgresql/*/bin/initdb  postgresql  store/postgres, server and cmd tests start a throwaway PostgreSQL cluster
postfix                                  postfix     server: TestPostfixSmarthost runs a private Postfix on loopback as the smarthost
swaks                                    swaks       server: TestPostfixSmarthost sends inbound mail with swaks
openssl                                  openssl     cmd tests: the OpenSSL DTLS client and server against esro perform/invoke --dtls
tshark                                   tshark      decode tests run the Wireshark dissector (contrib/wireshark) on captures of our server
nmap                                     nmap        ports tests run nmap -sU -sV with our probes against our server, device and engine
'

cd "$(dirname "$0")"
say() { printf 'test.sh: %s\n' "$*" >&2; }

# found SPEC: is the command (or one of its "|" alternatives) present?
found() {
	local alt
	local IFS='|'
	for alt in $1; do
		# A path glob was expanded by this very loop (an unmatched one
		# stays literal and fails -x).
		if [[ $alt == /* ]]; then
			[[ -f $alt && -x $alt ]] && return 0
		elif PATH="$PATH:/usr/sbin:/sbin" command -v "$alt" >/dev/null 2>&1; then
			return 0
		fi
	done
	return 1
}

# check [pretend]: fills MISSING_PKGS (unique) and MISSING_LINES.
check() {
	local pretend=${1:-} cmd pkg why
	MISSING_PKGS=() MISSING_LINES=()
	while read -r cmd pkg why; do
		[[ -z $cmd || $cmd == \#* ]] && continue
		if [[ -n $pretend && " $EMSDP_TEST_PRETEND_MISSING " == *" $pkg "* ]] || ! found "$cmd"; then
			MISSING_LINES+=("  ${cmd%%|*}  (Debian package $pkg): $why")
			[[ " ${MISSING_PKGS[*]} " == *" $pkg "* ]] || MISSING_PKGS+=("$pkg")
		fi
	done <<<"$PREREQS"
}

if ! command -v go >/dev/null 2>&1; then
	say "go not found. The module needs Go $(sed -n 's/^go //p' go.mod) or newer; Debian's golang-go is older."
	say "Install Go from https://go.dev/dl/ (any Go 1.21+ also fetches the go.mod version itself), then rerun."
	exit 2
fi
go version

: "${EMSDP_TEST_PRETEND_MISSING:=}"
check pretend
if ((${#MISSING_PKGS[@]})); then
	say "missing programs the tests need:"
	printf '%s\n' "${MISSING_LINES[@]}" >&2
	apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
	install="apt-get update && apt-get install -y --no-install-recommends ${MISSING_PKGS[*]}"
	why_not=
	if [[ ${EMSDP_TEST_NO_INSTALL:-} == 1 ]]; then
		why_not="EMSDP_TEST_NO_INSTALL=1"
	elif ! command -v apt-get >/dev/null 2>&1; then
		why_not="no apt-get: this is not Debian or Ubuntu"
	elif ((EUID == 0)); then
		sudo=()
	elif ! command -v sudo >/dev/null 2>&1; then
		why_not="not root, and no sudo"
	elif [[ ${CI:-} == true || ! -t 0 ]]; then
		if sudo -n true 2>/dev/null; then
			sudo=(sudo -n)
		else
			why_not="not root, and sudo needs a password but there is no terminal (CI=${CI:-unset})"
		fi
	else
		sudo=(sudo)
	fi
	if [[ -n $why_not ]]; then
		say "cannot install them ($why_not)."
		if command -v apt-get >/dev/null 2>&1; then
			say "install them as root, then rerun ./test.sh:"
			printf '  %s\n' "$install" >&2
		else
			say "install what provides the commands above with your system's package manager (the"
			say "package names above are Debian's; yours may differ, e.g. postgresql-server on Fedora),"
			say "make sure the commands are in PATH (or where the first column says), then rerun ./test.sh."
		fi
		say "packages that need none of them also run alone: go test ./esro ./emsd ..."
		exit 2
	fi
	say "installing with ${sudo[*]:+${sudo[*]} }apt-get: ${MISSING_PKGS[*]}"
	"${sudo[@]}" "${apt[@]}" update
	"${sudo[@]}" "${apt[@]}" install -y --no-install-recommends "${MISSING_PKGS[@]}"
	check
	if ((${#MISSING_PKGS[@]})); then
		say "still missing after installing:"
		printf '%s\n' "${MISSING_LINES[@]}" >&2
		exit 2
	fi
fi

# The benchmark is a module of its own (bench/go.mod), so that the library's
# go.mod does not require what only the benchmark uses; it is vetted and
# tested here too. "./bench..." arguments name its packages.
pkgs=() bench_pkgs=() flags=()
for a in "$@"; do
	case $a in
	./bench | github.com/esro-emsdp/emsdp/bench) bench_pkgs+=(.) ;;
	./bench/*) bench_pkgs+=("./${a#./bench/}") ;;
	github.com/esro-emsdp/emsdp/bench/*) bench_pkgs+=("$a") ;;
	. | ./* | ../* | github.com/esro-emsdp/emsdp*) pkgs+=("$a") ;;
	*) flags+=("$a") ;;
	esac
done
if ((${#pkgs[@]} + ${#bench_pkgs[@]} == 0)); then
	pkgs=(./...) bench_pkgs=(./...)
fi

# gofmt over the whole tree (both modules), whatever packages were named:
# an unformatted file fails the run before any test.
say "gofmt -l ."
unformatted=$(gofmt -l .)
if [[ -n $unformatted ]]; then
	say "not gofmt-formatted (run gofmt -w on them):"
	printf '  %s\n' $unformatted >&2
	exit 1
fi

if ((${#pkgs[@]})); then
	say "go vet ${pkgs[*]}"
	go vet "${pkgs[@]}"
	say "go test ${flags[*]:+${flags[*]} }${pkgs[*]}"
	go test "${flags[@]}" "${pkgs[@]}"
fi
if ((${#bench_pkgs[@]})); then
	say "go vet -C bench ${bench_pkgs[*]}"
	go vet -C bench "${bench_pkgs[@]}"
	say "go test -C bench ${flags[*]:+${flags[*]} }${bench_pkgs[*]}"
	go test -C bench "${flags[@]}" "${bench_pkgs[@]}"
fi
say "passed in ${SECONDS}s"
