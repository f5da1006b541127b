
#compdef iota

_iota_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _IOTA_COMPLETE=complete_zsh iota)
}

compdef _iota_completion iota

