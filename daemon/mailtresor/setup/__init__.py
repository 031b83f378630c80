"""`mailtresor setup`: from `apt install` to the first archived message.

The command (mailtresor/cli/setup.py) asks its questions and hands the
answers to this package, whose modules each do one thing:

- answers.py   the answers and their checks (pure functions: a bad answer
               is a ValueError whose text says why; the command re-asks);
- certs.py     the appliance's certificates: made from a CA of its own, or
               given files checked (key matches, dates, host name);
- render.py    the texts setup writes or prints: mailtresor.toml, the
               trial control endpoint's control.toml, the enrolment the
               control host's admin runs, the Postfix/Sendmail/Exchange
               settings and the next commands;
- control.py   the control endpoint: the local one of --trial, the check of
               an enrolment (--check), and the volume step.
"""
