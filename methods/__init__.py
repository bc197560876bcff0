"""One module per method: an `OWDFAMethod` subclass named in conf/method/<name>.yaml."""
