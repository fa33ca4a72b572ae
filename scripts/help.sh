# Sourced by the scripts right after their header comment: with -h or --help as the first
# argument, prints that comment (the script's usage) and exits 0.
#
#   . "$(dirname "$0")/help.sh"
case "${1:-}" in
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac
