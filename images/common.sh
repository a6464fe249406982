# Shared by the scripts in images/ (sourced, not run).

# need_cargo NAME: cargo on PATH (from ~/.cargo/env if needed), or a clear error.
need_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "$1: cargo not found; install a Rust toolchain (https://rustup.rs)" >&2
        exit 1
    }
}

# install_packages NAME PKG...: installs the Debian packages that are missing.
install_packages() {
    local who=$1 missing=() p
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    echo "$who: installing ${missing[*]}" >&2
    local sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
}

# follow_ktap FILE: streams the KTAP lines of a guest console as they come (background).
follow_ktap() {
    tail -F -n +1 "$1" 2>/dev/null |
        sed -un 's/^\[ *[0-9.]*\] //; /^\(KTAP\|ok \|not ok \|1\.\.\|# \)/p; /page fault from EP/p' &
    follower=$!
}

# stop_following: ends follow_ktap.
stop_following() {
    sleep 0.3
    kill "${follower:-}" 2>/dev/null || true
}

# ktap_summary CONSOLE VMM_LOG [--suites NAME N] [--skip CASE]...: one line per KTAP suite on
# the console (timestamps already stripped) and the guest's verdict. Succeeds only when every
# suite's plan ran to its end with no failure and no skipped case except the CASEs given (a
# SKIP is a verdict of its own, not a pass), NAME ran N times when asked, and the guest gave
# its verdict through the test-exit port with 0 failures: a panic, a reset, a hang or a short
# plan fails, and the console's tail is shown.
ktap_summary() {
    local console=$1 vmmlog=$2 ok=0 ended allow=" " want_suite= want_count=0
    shift 2
    while (($#)); do
        case "$1" in
        --suites) want_suite=$2 want_count=$3; shift 3 ;;
        --skip) allow+="$2 "; shift 2 ;;
        *) echo "ktap_summary: unknown option '$1'" >&2; return 2 ;;
        esac
    done
    awk -v allow="$allow" -v want_suite="$want_suite" -v want_count="$want_count" '
        function flush() {
            if (!started) return
            printf "suite %s: %d passed, %d failed, %d skipped of %s planned\n",
                name, pass, fail, skip, plan == "" ? "?" : plan
            if (plan == "" || fail || pass + skip + fail != plan + 0) bad = 1
            split(name, w, " ")
            if (w[1] == want_suite) suites++
        }
        /^KTAP version/ { flush(); started = 1; name = "?"; plan = ""; pass = fail = skip = 0; next }
        !started { next }
        /^# [a-z_]+:/ && name == "?" {
            name = $2; sub(/:$/, "", name)
            if ($3 ~ /^[0-9a-f]+:[0-9a-f]+:[0-9a-f]+\.[0-9]/) name = name " " $3
            next
        }
        /^1\.\./ && plan == "" { plan = substr($0, 4) + 0; next }
        /^not ok / { fail++; next }
        /^ok .*# SKIP/ {
            skip++
            case_name = $3
            if (case_name == "-") case_name = $4
            if (index(allow, " " case_name " ") == 0) {
                printf "suite %s: %s was skipped, and this run must run it\n", name, case_name
                bad = 1
            }
            next
        }
        /^ok / { pass++; next }
        END {
            flush()
            if (!started) { print "no KTAP suite on the console"; bad = 1 }
            if (want_suite != "" && suites != want_count + 0) {
                printf "%d %s suites reported, %d expected\n", suites, want_suite, want_count
                bad = 1
            }
            exit bad
        }' <<<"$console" || ok=1
    ended=$(grep -o 'guest ended ([^)]*)' "$vmmlog" | tail -1 || true)
    case "$ended" in
    "guest ended (test exit code 0)") echo "verdict: 0 failed (test-exit port)" ;;
    "guest ended (test exit code "*) echo "verdict: ${ended#guest ended (test exit code } failed (test-exit port)" | tr -d ')'; ok=1 ;;
    "") echo "verdict: none (the VMM ended without one; see its log)"; ok=1 ;;
    *) echo "verdict: none, ${ended#guest ended } (a panic or a reset is not a verdict)"; ok=1 ;;
    esac
    grep -m1 'Kernel panic - not syncing' <<<"$console" | sed 's/^/panic: /' || true
    if [ $ok -ne 0 ]; then
        echo "--- the console's last lines:"
        tail -15 <<<"$console"
        echo "---"
    fi
    return $ok
}

# expand_pages: reads FIRST+COUNT hex runs (one per word) and prints one page number per line
# (decimal), sorted as text (for comm).
expand_pages() {
    tr -d '\r' | tr ' ' '\n' | awk -F+ 'NF == 2 {
        first = 0; count = 0
        for (i = 1; i <= length($1); i++) first = first * 16 + index("0123456789abcdef", substr($1, i, 1)) - 1
        for (i = 1; i <= length($2); i++) count = count * 16 + index("0123456789abcdef", substr($2, i, 1)) - 1
        for (p = first; p < first + count; p++) print p
    }' | sort
}

# compare_written CONSOLE DIRTY_LOG: the set of pages the guest suite says its devices wrote
# (`# written ranges:` lines) against the VMM's dirty log (`--dirty-log-out`). Prints one line;
# succeeds only when the sets are equal.
compare_written() {
    local console=$1 log=$2 dir want got missing extra
    dir=$(mktemp -d)
    grep -o '# written ranges:.*' "$console" | sed 's/# written ranges://' | expand_pages > "$dir/want"
    if [ -f "$log" ]; then tail -n +2 "$log" | expand_pages > "$dir/got"; else : > "$dir/got"; fi
    want=$(wc -l < "$dir/want"); got=$(wc -l < "$dir/got")
    missing=$(comm -23 "$dir/want" "$dir/got" | wc -l)
    extra=$(comm -13 "$dir/want" "$dir/got" | wc -l)
    rm -rf "$dir"
    if [ "$missing" -eq 0 ] && [ "$extra" -eq 0 ] && [ "$want" -gt 0 ]; then
        echo "pages the devices wrote: $want by the suite's account, the same $got pages in the VMM's dirty log"
        return 0
    fi
    echo "pages the devices wrote: $want by the suite's account, $got in the VMM's dirty log: $missing missing, $extra extra (DIFFER)"
    return 1
}

# plot_svg WHO OUT.svg TITLE XLABEL YLABEL DATA [STYLE]: draws DATA (whitespace columns, a
# header line naming them; column 1 is x, one series per further column) as an SVG with
# gnuplot (installed from Debian when missing). STYLE: "histogram" (clustered bars, log
# scale) or "lines" (default).
plot_svg() {
    local who=$1 out=$2 title=$3 xlabel=$4 ylabel=$5 data=$6 style=${7:-lines}
    install_packages "$who" gnuplot-nox
    local cols plot extra=""
    cols=$(head -1 "$data" | wc -w)
    if [ "$style" = histogram ]; then
        plot="plot for [i=2:$cols] '$data' using i:xtic(1) title columnheader(i)"
        extra="set style data histograms; set style histogram clustered gap 1; set style fill solid 0.8 border -1; set logscale y; set xtics rotate by -25"
    else
        plot="plot for [i=2:$cols] '$data' using 1:i with linespoints title columnheader(i)"
    fi
    gnuplot <<EOF_GNUPLOT
set terminal svg size 900,500 dynamic noenhanced font "sans,12" background rgb "white"
set output "$out"
set title "$title"
set xlabel "$xlabel"
set ylabel "$ylabel"
set key outside right
set grid ytics
$extra
$plot
EOF_GNUPLOT
}

